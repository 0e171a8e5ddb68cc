"""The SPIFFE Workload API: its service, a client and an X.509 source built on it."""
