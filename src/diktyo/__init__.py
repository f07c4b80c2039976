"""diktyo: a service mesh in Python with Istio's YAML."""

from diktyo import _build

__version__ = "0.1.0"

# compiled hot path or pure Python (DIKTYO_PURE=1, or a stale compiled build): see _build
_build.activate()
