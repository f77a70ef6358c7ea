"""chainrule's web dashboard: graphs drawn with their values and gradients, datasets, and jobs with live curves.

A separate process (`chainrule dashboard`) and a client of any chainrule server through the
public gRPC API only, as any other program would be. Install it with
`pip install 'chainrule[dashboard]'`.
"""
