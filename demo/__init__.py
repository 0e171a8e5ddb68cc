"""``make demo``: spiffe-sidecar running on this machine, narrated (:mod:`demo.run`)."""
