"""Node attestation: how an agent proves which node it runs on, and what the server learns of it.

Each attestor implements :class:`~controlplane.attest.base.NodeAttestor`: ``join_token``,
``x509pop`` and ``k8s_psat`` (with :mod:`~controlplane.attest.jwks` for the issuer's keys). The
agent API looks them up by name, so new attestors (cloud instance identity) slot in without
touching the rest.
"""
