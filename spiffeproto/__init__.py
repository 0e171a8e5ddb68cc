"""Generated protobuf and gRPC code for spiffe-sidecar's protos. Never edit by hand.

Regenerate with ``python proto/generate.py`` (``make`` does it when a ``.proto`` changes). Only
converter and servicer modules import from here; the rest of the code speaks ``spiffecore`` types.
"""
