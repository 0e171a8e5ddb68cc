"""Node attestation, sync with the control plane, the SVID cache and caller attestation."""
