"""Workload attestors: what the agent learns of a calling process, as selectors."""
