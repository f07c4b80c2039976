"""diktyo's CustomResourceDefinitions: Istio's own CRDs for the kinds diktyo understands.

``deploy/crds/istio-crds.yaml`` is cut, unchanged, out of Istio's generated
``customresourcedefinitions.gen.yaml`` (Apache License 2.0, from the ``istio/api``
repository), so users' existing Istio YAML applies unchanged. Regenerate it with::

    python -m diktyo.control.inject.crds [SOURCE] [OUTPUT]

(default SOURCE ``../shared/istio/customresourcedefinitions.gen.yaml`` beside the repository,
OUTPUT ``deploy/crds/istio-crds.yaml``). ``to_json_schema`` turns a CRD's OpenAPI v3
structural schema into a JSON Schema that the ``jsonschema`` package can check objects with.
"""

from __future__ import annotations

import copy
import io
import re
import sys
from pathlib import Path
from typing import Any

from ruamel.yaml import YAML

#: (group, kind) of every CRD diktyo serves.
KINDS: tuple[tuple[str, str], ...] = (
    ("networking.istio.io", "VirtualService"),
    ("networking.istio.io", "DestinationRule"),
    ("networking.istio.io", "ServiceEntry"),
    ("networking.istio.io", "Gateway"),
    ("networking.istio.io", "Sidecar"),
    ("security.istio.io", "PeerAuthentication"),
    ("security.istio.io", "AuthorizationPolicy"),
    ("security.istio.io", "RequestAuthentication"),
)

HEADER = """\
# diktyo's CustomResourceDefinitions: Istio's CRDs for the kinds diktyo understands.
# Taken unchanged from Istio's generated customresourcedefinitions.gen.yaml (istio/api,
# kubernetes/), Copyright Istio Authors, licensed under the Apache License, Version 2.0
# (http://www.apache.org/licenses/LICENSE-2.0). This file is data, not diktyo's code.
# Regenerate: python -m diktyo.control.inject.crds
"""

_DOC_SPLIT = re.compile(r"^---[ \t]*$", re.MULTILINE)


def _yaml() -> YAML:
    return YAML(typ="safe")


def select_crds(source_text: str, kinds: tuple[tuple[str, str], ...] = KINDS) -> list[str]:
    """The source text of each CRD document whose (group, kind) is in ``kinds``, in ``kinds`` order."""
    found: dict[tuple[str, str], str] = {}
    for chunk in _DOC_SPLIT.split(source_text):
        doc = _yaml().load(chunk)
        if not isinstance(doc, dict) or doc.get("kind") != "CustomResourceDefinition":
            continue
        spec = doc.get("spec") or {}
        key = (spec.get("group", ""), (spec.get("names") or {}).get("kind", ""))
        if key in kinds:
            lines = [ln for ln in chunk.strip("\n").splitlines() if not ln.startswith("# DO NOT EDIT")]
            found[key] = "\n".join(lines).strip("\n") + "\n"
    missing = [f"{k} ({g})" for g, k in kinds if (g, k) not in found]
    if missing:
        raise ValueError(f"CRD source lacks {', '.join(missing)}: is it Istio's customresourcedefinitions.gen.yaml?")
    return [found[k] for k in kinds]


def generate(source_text: str) -> str:
    """The whole ``istio-crds.yaml`` text for Istio's CRD source text."""
    return HEADER + "".join("---\n" + doc for doc in select_crds(source_text))


def load_crds(text: str) -> list[dict[str, Any]]:
    """Parse a multi-document CRD file into dicts (empty documents skipped)."""
    return [d for d in _yaml().load_all(io.StringIO(text)) if d]


def find_crd(crds: list[dict[str, Any]], api_version: str, kind: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """(crd, version entry) serving ``api_version``/``kind``; KeyError if none does."""
    group, _, version = api_version.rpartition("/")
    for crd in crds:
        spec = crd["spec"]
        if spec["group"] == group and spec["names"]["kind"] == kind:
            for ver in spec["versions"]:
                if ver["name"] == version and ver.get("served"):
                    return crd, ver
    raise KeyError(f"no CRD serves {api_version} {kind}")


def to_json_schema(schema: dict[str, Any], *, strict: bool = True) -> dict[str, Any]:
    """A JSON Schema (draft 2020-12 subset) equal to a Kubernetes structural schema.

    ``x-kubernetes-int-or-string`` becomes "integer or string"; ``nullable`` adds null;
    with ``strict`` every object with ``properties`` rejects unknown fields (the API server
    would prune them silently; ``kubectl --validate=strict`` rejects them), except where
    ``x-kubernetes-preserve-unknown-fields`` says otherwise. CEL rules
    (``x-kubernetes-validations``) are not evaluated.
    """

    def conv(node: Any) -> Any:
        if isinstance(node, list):
            return [conv(n) for n in node]
        if not isinstance(node, dict):
            return node
        out: dict[str, Any] = {}
        for key, value in node.items():
            if key.startswith("x-kubernetes-") or key in ("nullable", "description", "format"):
                continue
            if key in ("properties", "patternProperties"):
                out[key] = {k: conv(v) for k, v in value.items()}
            else:
                out[key] = conv(value)
        if node.get("x-kubernetes-int-or-string"):
            out.pop("type", None)
            out.setdefault("anyOf", [{"type": "integer"}, {"type": "string"}])
        if node.get("nullable") and "type" in out:
            out["type"] = [out["type"], "null"]
        if (strict and "properties" in node and "additionalProperties" not in node
                and not node.get("x-kubernetes-preserve-unknown-fields")):
            out["additionalProperties"] = False
        return out

    return conv(copy.deepcopy(schema))  # type: ignore[no-any-return]


def default_source() -> Path:
    return Path(__file__).resolve().parents[4].parent / "shared" / "istio" / "customresourcedefinitions.gen.yaml"


def default_output() -> Path:
    return Path(__file__).resolve().parents[4] / "deploy" / "crds" / "istio-crds.yaml"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    source = Path(args[0]) if args else default_source()
    output = Path(args[1]) if len(args) > 1 else default_output()
    if not source.is_file():
        print(f"crds: {source} not found; pass Istio's customresourcedefinitions.gen.yaml as the "
              "first argument", file=sys.stderr)
        return 1
    output.write_text(generate(source.read_text(encoding="utf-8")), encoding="utf-8")
    print(f"wrote {output} ({len(KINDS)} CRDs)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
