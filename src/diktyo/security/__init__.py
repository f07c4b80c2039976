"""Security building blocks shared by the sidecar and the control plane (SPIFFE ids, keys, paths).

Imports only ``diktyo.core`` and ``diktyo.snapshot``, so both ``proxy`` and ``control`` may use it.
"""
