"""diktyo.api: Istio-compatible user config (pydantic models) and YAML loading with positions.

from diktyo.api import load_paths, load_text
result = load_paths(["samples/bookinfo/networking"])
for err in result.errors: print(err)      # FILE:LINE:COL: error: FIELD: MESSAGE (hint: ...)
for res in result.resources: res.kind, res.name, res.spec, res.position("spec.http[0]")
"""

from diktyo.api.duration import Duration, DurationError, parse_duration
from diktyo.api.errors import ConfigError
from diktyo.api.loader import LoadResult, field_names, load_paths, load_text
from diktyo.api.resource import KINDS, Resource

__all__ = [
    "KINDS",
    "ConfigError",
    "Duration",
    "DurationError",
    "LoadResult",
    "Resource",
    "field_names",
    "load_paths",
    "load_text",
    "parse_duration",
]
