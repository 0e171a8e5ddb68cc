"""spiffe-proxy: an mTLS TCP proxy that gives legacy services SPIFFE identities and authorization."""
