"""spiffeops: operational plumbing shared by the long-running commands.

``spiffe-server``, ``spiffe-agent`` and ``spiffe-proxy`` may not import each other, but they run
the same way: structured logs (:mod:`spiffeops.logs`), a YAML config file loaded into a frozen
dataclass schema (:mod:`spiffeops.config`), a status HTTP endpoint for health, readiness and
Prometheus metrics (:mod:`spiffeops.status`), and signal handling and private-file writing for
asyncio mains (:mod:`spiffeops.lifecycle`).

The standard library, PyYAML and prometheus-client only; none of our other packages and no gRPC
(an import-linter contract). Import the submodules directly: this package re-exports nothing, so
a command pays only for the plumbing it uses.
"""
