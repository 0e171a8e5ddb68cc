"""Tests of the control plane's certificate authority, mirroring controlplane/ca/."""
