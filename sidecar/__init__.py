"""spiffe-agent and spiffe-proxy: the node agent (Workload API, Envoy SDS, helper mode) and the mTLS proxy."""
