"""diktyo: a service mesh in Python with Istio's YAML."""

__version__ = "0.1.0"
