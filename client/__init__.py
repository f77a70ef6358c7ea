"""Python client for chainrule."""
