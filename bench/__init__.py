"""chainrule's benchmark suite: `python -m bench` (full) or `python -m bench --quick`.

Every measurement is a median over repeated runs compared with a baseline timed in the same
process run, because the machines are shared and noisy: a ratio survives noise that shifts both
sides, an absolute time on its own does not. See bench/README.md.
"""
