"""HTTP filters of the sidecar, one module per filter (fault, authz, telemetry, ...)."""
