"""Envoy's Secret Discovery Service (SDS v3) on the agent's socket."""
