"""spiffe-server: the control plane (CA, registration store, node attestation, agent and admin APIs)."""
