"""Routing: route matching, retry state, timeouts, mirroring."""
