"""etcd as the control plane's shared store: a v3 JSON-gateway client, the backend, sealed secrets."""
