"""Ingest: config stores (files, Kubernetes, etcd) and the service registry."""
