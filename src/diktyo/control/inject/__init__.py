"""Kubernetes: sidecar injection (pure pod mutation), the admission webhook and install manifests."""
