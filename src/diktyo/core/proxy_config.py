"""Istio's per-pod proxy settings: the ``proxy.istio.io/config`` annotation (a ProxyConfig in
YAML or JSON). diktyo reads ``concurrency`` from it: the sidecar's worker processes (0 = one
per core), which the injector (``DIKTYO_CONCURRENCY``) and ``diktyo up`` pass to the sidecar.
Other ProxyConfig fields are accepted and ignored."""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

ANNOTATION = "proxy.istio.io/config"
MAX_CONCURRENCY = 64


def check_concurrency(value: Any, where: str) -> int:
    """A ProxyConfig ``concurrency`` value: an integer 0..64; ValueError naming ``where``."""
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= MAX_CONCURRENCY:
        raise ValueError(f"{where}: concurrency {value!r} is not a number of worker processes "
                         f"0-{MAX_CONCURRENCY} (0 = one per core)")  # fmt: skip
    return value


def annotation_concurrency(annotations: Mapping[str, str] | None) -> int | None:
    """``concurrency`` from the pod's ``proxy.istio.io/config`` annotation, None when it does not
    set one. Raises ValueError (naming the annotation) for text that is no ProxyConfig."""
    raw = (annotations or {}).get(ANNOTATION)
    if raw is None or not raw.strip():
        return None
    try:
        doc: Any = json.loads(raw)
    except ValueError:
        from ruamel.yaml import YAML
        from ruamel.yaml.error import YAMLError

        try:
            doc = YAML(typ="safe").load(raw)
        except YAMLError as exc:
            raise ValueError(f"annotation {ANNOTATION}: not YAML or JSON: {exc}") from None
    if not isinstance(doc, dict):
        raise ValueError(f"annotation {ANNOTATION}: expected a ProxyConfig mapping such as "
                         f"'{{\"concurrency\": 2}}', got {raw!r}")  # fmt: skip
    if "concurrency" not in doc or doc["concurrency"] is None:
        return None
    return check_concurrency(doc["concurrency"], f"annotation {ANNOTATION}")
