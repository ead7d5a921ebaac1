"""ddm's model library: data, clustering, DiT experts, flow matching, router, routed ensemble,
training, checkpoints and metrics. It imports no other ddm package."""

__version__ = "0.1.0"
