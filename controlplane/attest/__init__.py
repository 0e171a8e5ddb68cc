"""Node attestation: how an agent proves which node it runs on, and what the server learns of it.

Each attestor implements :class:`~controlplane.attest.base.NodeAttestor`; the agent API looks them
up by name, so new attestors (Kubernetes PSAT, cloud instance identity) slot in without touching
the rest.
"""
