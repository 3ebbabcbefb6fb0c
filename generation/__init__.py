"""Generation: the service that owns the diffusion pipeline and the queue in front of it.

`contract` is the wire format (stdlib only, imported by the bot too); everything that touches
torch lives behind the single worker thread.
"""
