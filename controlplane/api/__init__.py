"""spiffe-server's gRPC APIs: the agent API (TLS) and the registration API (unix socket)."""
