"""Loading Istio YAML: multi-document files -> validated Resources, errors with file:line:col.

Each ``---`` document is parsed on its own (ruamel.yaml round-trip loader, which keeps the
line and column of every key), so a broken document does not stop the good ones beside it.
"""

from __future__ import annotations

import difflib
import re
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ValidationError
from ruamel.yaml import YAML
from ruamel.yaml.comments import CommentedMap, CommentedSeq
from ruamel.yaml.error import MarkedYAMLError, YAMLError

from diktyo.api.crd_schema import spec_schema, validate
from diktyo.api.errors import ConfigError
from diktyo.api.gateway_api import GATEWAY_API, GATEWAY_API_IGNORED
from diktyo.api.kinds import KIND_TABLE, is_mesh_group, lookup, rows_of_kind
from diktyo.api.limits import ParseLimitError, check_size, check_yaml
from diktyo.api.resource import Resource

_DOC_SEP = re.compile(r"^(---|\.\.\.)(\s|$)")
# Kubernetes object names (RFC 1123 subdomain) and namespaces (RFC 1123 label)
_DNS_SUBDOMAIN = re.compile(
    r"^(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
)
_DNS_LABEL = re.compile(r"^(?=.{1,63}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?$")


def _suggest_name(name: str) -> str:
    fixed = re.sub(r"[^a-z0-9.-]+", "-", name.lower()).strip("-.")
    return fixed[:253] or "my-resource"


@dataclass
class LoadResult:
    resources: list[Resource] = field(default_factory=list)
    errors: list[ConfigError] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(e.severity == "error" for e in self.errors)

    def extend(self, other: LoadResult) -> None:
        self.resources.extend(other.resources)
        self.errors.extend(other.errors)


def load_paths(paths: list[str | Path] | tuple[str | Path, ...]) -> LoadResult:
    """Load files and directories (a directory: all ``*.yaml``/``*.yml`` below it, sorted)."""
    result = LoadResult()
    for p in paths:
        path = Path(p)
        if path.is_dir():
            files = sorted(
                f for f in path.rglob("*") if f.suffix in (".yaml", ".yml") and f.is_file()
            )
        else:
            files = [path]
        for f in files:
            try:
                check_size(f.stat().st_size)
                text = f.read_text(encoding="utf-8")
            except ParseLimitError as exc:
                result.errors.append(_limit_error(exc, str(f)))
                continue
            except OSError as exc:
                result.errors.append(
                    ConfigError(
                        str(f),
                        0,
                        0,
                        "",
                        f"cannot read file: {exc.strerror or exc}",
                        "check the path and permissions",
                    )
                )
                continue
            except UnicodeDecodeError:
                result.errors.append(
                    ConfigError(str(f), 0, 0, "", "file is not UTF-8 text", "save it as UTF-8")
                )
                continue
            result.extend(load_text(text, str(f)))
    return result


def load_text(text: str, filename: str = "<string>") -> LoadResult:
    """Load every document of a (multi-document) YAML text."""
    result = LoadResult()
    yaml = _new_yaml()
    try:
        check_size(len(text.encode("utf-8", "surrogatepass")))
    except ParseLimitError as exc:
        result.errors.append(_limit_error(exc, filename))
        return result
    for offset, chunk in _split_documents(text):
        try:
            check_yaml(chunk, line_offset=offset)  # bombs, deep nesting: before composing
            doc = yaml.load(chunk)
        except ParseLimitError as exc:
            result.errors.append(_limit_error(exc, filename))
            continue
        except MarkedYAMLError as exc:
            yaml = _new_yaml()  # do not reuse a parser that stopped half-way
            mark = exc.problem_mark or exc.context_mark
            line = mark.line + offset + 1 if mark is not None else offset + 1
            col = mark.column + 1 if mark is not None else 1
            last = offset + len(chunk.rstrip().splitlines())
            if line > last:  # "unexpected end of stream": point at the last line
                line, col = last, 1
            result.errors.append(_yaml_error(exc, filename, line, col))
            continue
        except YAMLError as exc:
            yaml = _new_yaml()
            result.errors.append(
                ConfigError(
                    filename, offset + 1, 1, "", f"YAML error: {exc}", "fix the YAML syntax"
                )
            )
            continue
        if doc is None:
            continue
        _load_document(doc, filename, offset, result)
    return result


def _limit_error(exc: ParseLimitError, filename: str) -> ConfigError:
    return ConfigError(filename, exc.line, exc.col, "", exc.message, exc.hint)


def _new_yaml() -> YAML:
    yaml = YAML(typ="rt")
    yaml.allow_duplicate_keys = False
    return yaml


def _split_documents(text: str) -> list[tuple[int, str]]:
    """Split at ``---`` / ``...`` lines: [(line offset of the chunk, chunk text)]."""
    chunks: list[tuple[int, str]] = []
    lines = text.splitlines(keepends=True)
    start = 0
    for i, line in enumerate(lines):
        if _DOC_SEP.match(line):
            chunks.append((start, "".join(lines[start:i])))
            rest = line[3:].strip()
            if line.startswith("---") and rest and not rest.startswith("#"):
                # content on the '---' line itself: keep it, blanked separator
                lines[i] = "   " + line[3:]
                start = i
            else:
                start = i + 1
    chunks.append((start, "".join(lines[start:])))
    return [(o, c) for o, c in chunks if c.strip()]


def _yaml_error(exc: MarkedYAMLError, filename: str, line: int, col: int) -> ConfigError:
    problem = exc.problem or exc.context or "syntax error"
    name = type(exc).__name__
    if name == "DuplicateKeyError":
        key = re.search(r'found duplicate key "([^"]*)"', str(exc))
        keyname = key.group(1) if key else ""
        return ConfigError(
            filename,
            line,
            col,
            keyname,
            f"duplicate key {keyname!r}" if keyname else "duplicate key",
            "each key may appear only once in a mapping; remove or merge the repeated key",
        )
    return ConfigError(
        filename,
        line,
        col,
        "",
        f"YAML syntax error: {problem}",
        "check indentation, colons and quoting around this position",
    )


# --------------------------------------------------------------------------- documents


def _load_document(doc: Any, filename: str, offset: int, result: LoadResult) -> None:
    if not isinstance(doc, CommentedMap):
        line = offset + 1
        result.errors.append(
            ConfigError(
                filename,
                line,
                1,
                "",
                f"a document must be a mapping, got {_type_name(doc)}",
                "each document needs apiVersion, kind, metadata and spec",
            )
        )
        return
    positions: dict[str, tuple[int, int]] = {}
    _collect_positions(doc, "", offset, positions)
    start = (doc.lc.line + offset + 1, doc.lc.col + 1)
    data = _to_builtins(doc)

    def err(path: str, message: str, hint: str = "", severity: str = "error") -> ConfigError:
        line, col = _position(positions, path, start)
        return ConfigError(filename, line, col, path, message, hint, severity)  # type: ignore[arg-type]

    api_version = data.get("apiVersion")
    kind = data.get("kind")
    errors: list[ConfigError] = []
    if not kind and not api_version:
        result.errors.append(
            err(
                "",
                "not a Kubernetes object: the document has neither apiVersion nor kind",
                "a config folder holds Istio and Kubernetes objects; keep other YAML (Helm "
                "values, OpenAPI specs, ...) elsewhere",
            )
        )
        return
    if not isinstance(kind, str) or not kind:
        result.errors.append(
            err("kind", "missing required field 'kind'", "set kind, e.g. 'kind: VirtualService'")
        )
        return
    if not isinstance(api_version, str) or not api_version:
        result.errors.append(
            err(
                "apiVersion",
                "missing required field 'apiVersion'",
                "set apiVersion, e.g. 'apiVersion: networking.istio.io/v1'",
            )
        )
        return
    if kind == "List" or (kind.endswith("List") and "items" in data):
        _load_list(doc, data, filename, offset, result, err)
        return
    group, _, version = api_version.rpartition("/")
    row = lookup(group, kind)
    if row is None:
        result.errors.append(_unknown_kind(kind, api_version, group, data, err))
        return
    if version not in row.versions:
        result.errors.append(
            err(
                "apiVersion",
                f"unsupported apiVersion {api_version!r} for kind {kind}",
                "use " + " or ".join(row.api_versions()),
            )
        )
        return
    for key in data:
        if key not in ("apiVersion", "kind", "metadata", "spec", "status"):
            close = difflib.get_close_matches(
                str(key), ["apiVersion", "kind", "metadata", "spec"], n=1
            )
            errors.append(
                err(
                    str(key),
                    f"unknown field {key!r}",
                    f"did you mean {close[0]!r}?"
                    if close
                    else "top-level fields are apiVersion, kind, metadata, spec",
                )
            )
    metadata = data.get("metadata")
    name = ""
    namespace = "default"
    labels: dict[str, str] = {}
    annotations: dict[str, str] = {}
    if not isinstance(metadata, dict):
        if row.needs_name or metadata is not None:
            errors.append(
                err("metadata", "missing required field 'metadata'", "add 'metadata: {name: NAME}'")
            )
    else:
        name = metadata.get("name") or ""
        if (not isinstance(name, str) or not name) and ("name" in metadata or row.needs_name):
            errors.append(
                err(
                    "metadata.name" if "name" in metadata else "metadata",
                    "missing required field 'metadata.name'",
                    "give the resource a name",
                )
            )
            name = str(name or "")
        if isinstance(name, str) and name and not _DNS_SUBDOMAIN.match(name):
            errors.append(
                err(
                    "metadata.name",
                    f"invalid name {name!r}: must be lower case letters, digits, '-' and '.', "
                    "starting and ending with a letter or digit (at most 253 characters)",
                    f"e.g. {_suggest_name(name)!r}",
                )
            )
        ns = metadata.get("namespace")
        if ns is not None:
            if not isinstance(ns, str) or not _DNS_LABEL.match(ns):
                errors.append(
                    err(
                        "metadata.namespace",
                        f"invalid namespace {ns!r}: must be lower case letters, digits and '-' "
                        "(at most 63 characters)",
                        "e.g. 'default'",
                    )
                )
            else:
                namespace = ns
        raw_labels = metadata.get("labels") or {}
        if isinstance(raw_labels, dict):
            labels = {str(k): str(v) for k, v in raw_labels.items()}
        raw_annotations = metadata.get("annotations") or {}
        if isinstance(raw_annotations, dict):
            annotations = {str(k): str(v) for k, v in raw_annotations.items()}
    spec_data = data.get("spec")
    if spec_data is None:
        spec_data = {}
    spec: BaseModel | None = None
    if not isinstance(spec_data, dict):
        errors.append(err("spec", f"spec must be a mapping, got {_type_name(spec_data)}"))
    elif row.model is None:
        schema = spec_schema(kind, version)
        for path, message in validate(spec_data, schema) if schema else []:
            errors.append(
                err(path, message, f"Istio's {kind} CRD ({api_version}) does not accept this")
            )
        if not errors:
            errors.append(
                err(
                    "kind",
                    f"{kind} {namespace}/{name or '-'} ignored: {row.reason}",
                    "it has no effect on diktyo's mesh (Istio would apply it)",
                    severity="warning",
                )
            )
        result.errors.extend(errors)
        return
    else:
        schema = spec_schema(kind, version) if row.crd_checked else None
        for path, message in validate(spec_data, schema) if schema else []:
            errors.append(
                err(path, message, f"Istio's {kind} CRD ({api_version}) does not accept this")
            )
        try:
            if not errors:
                spec = row.model.model_validate(spec_data)
        except ValidationError as exc:
            for e in exc.errors():
                errors.append(_pydantic_error(e, row.model, err))
    if errors or spec is None:
        result.errors.extend(errors)
        return
    result.resources.append(
        Resource(
            kind=kind,
            api_version=api_version,
            name=name,
            namespace=namespace,
            spec=spec,
            file=filename,
            line=start[0],
            col=start[1],
            positions=positions,
            labels=labels,
            annotations=annotations,
            status=dict(data["status"]) if isinstance(data.get("status"), dict) else {},
        )
    )
    if group == GATEWAY_API and kind in GATEWAY_API_IGNORED:
        result.errors.append(err("kind", *GATEWAY_API_IGNORED[kind], severity="warning"))


def _load_list(
    doc: CommentedMap,
    data: dict[str, Any],
    filename: str,
    offset: int,
    result: LoadResult,
    err: Callable[..., ConfigError],
) -> None:
    """``kind: List`` (``kubectl get -o yaml``): load each of ``items`` as its own document."""
    items = doc.get("items")
    if items is None:
        return
    if not isinstance(items, CommentedSeq):
        result.errors.append(
            err(
                "items",
                f"items must be a list of objects, got {_type_name(data.get('items'))}",
                "write 'items:' followed by '- apiVersion: ...' entries",
            )
        )
        return
    for i, item in enumerate(items):
        if isinstance(item, CommentedMap):
            _load_document(item, filename, offset, result)
            continue
        result.errors.append(
            err(
                f"items[{i}]",
                f"each item of a {data.get('kind')} must be a mapping, got {_type_name(item)}",
                "each item needs apiVersion, kind, metadata and spec",
            )
        )


def _unknown_kind(
    kind: str, api_version: str, group: str, data: dict[str, Any], err: Callable[..., ConfigError]
) -> ConfigError:
    """The problem with a ``(group, kind)`` not in the kind table."""
    rows = rows_of_kind(kind)
    if rows:  # a known kind under another group, e.g. networking.istio.io/v1 HTTPRoute
        choices = [v for row in rows for v in row.api_versions()]
        return err(
            "apiVersion",
            f"unsupported apiVersion {api_version!r} for kind {kind}",
            "use " + " or ".join(choices),
        )
    if is_mesh_group(group):
        same_group = [row.kind for row in KIND_TABLE if row.group == group]
        candidates = same_group or [row.kind for row in KIND_TABLE if is_mesh_group(row.group)]
        close = difflib.get_close_matches(kind, candidates, n=1)
        return err(
            "kind",
            f"unknown kind {kind!r} in {group}",
            f"did you mean {close[0]!r}?"
            if close
            else "diktyo knows " + ", ".join(dict.fromkeys(candidates)),
        )
    meta = data.get("metadata")
    name = meta.get("name", "") if isinstance(meta, dict) else ""
    return err(
        "kind",
        f"{api_version} {kind} {name} is not a mesh resource; ignored".replace("  ", " "),
        "diktyo reads Istio's kinds and Kubernetes Services",
        severity="info",
    )


def _position(
    positions: dict[str, tuple[int, int]], path: str, default: tuple[int, int]
) -> tuple[int, int]:
    while path:
        pos = positions.get(path)
        if pos is not None:
            return pos
        if path.endswith("]"):
            path = path[: path.rindex("[")]
        elif "." in path:
            path = path[: path.rindex(".")]
        else:
            path = ""
    return default


def _collect_positions(node: Any, path: str, offset: int, out: dict[str, tuple[int, int]]) -> None:
    if isinstance(node, CommentedMap):
        for key, value in node.items():
            sub = f"{path}.{key}" if path else str(key)
            try:
                line, col = node.lc.key(key)
                out[sub] = (line + offset + 1, col + 1)
            except (KeyError, TypeError, AttributeError):
                pass
            _collect_positions(value, sub, offset, out)
    elif isinstance(node, CommentedSeq):
        for i, value in enumerate(node):
            sub = f"{path}[{i}]"
            try:
                line, col = node.lc.item(i)
                out[sub] = (line + offset + 1, col + 1)
            except (KeyError, TypeError, AttributeError):
                pass
            _collect_positions(value, sub, offset, out)


def _to_builtins(node: Any) -> Any:
    """ruamel's Commented*/Scalar* types -> plain dict/list/str/int/float/bool (map keys as str)."""
    if isinstance(node, dict):
        return {
            str(k) if not isinstance(k, bool) else str(k).lower(): _to_builtins(v)
            for k, v in node.items()
        }
    if isinstance(node, list):
        return [_to_builtins(v) for v in node]
    if isinstance(node, bool):
        return bool(node)
    if isinstance(node, int):
        return int(node)
    if isinstance(node, float):
        return float(node)
    if isinstance(node, str):
        return str(node)
    return node


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "boolean"
    if isinstance(value, int):
        return "integer"
    if isinstance(value, float):
        return "number"
    if isinstance(value, str):
        return "string"
    if isinstance(value, list):
        return "list"
    if isinstance(value, dict):
        return "mapping"
    return type(value).__name__


# --------------------------------------------------------------------------- pydantic errors

_TYPE_WORDS = {
    "int_type": "an integer",
    "int_parsing": "an integer",
    "int_from_float": "an integer",
    "float_type": "a number",
    "float_parsing": "a number",
    "string_type": "a string",
    "bool_type": "a boolean (true or false)",
    "bool_parsing": "a boolean (true or false)",
    "dict_type": "a mapping",
    "model_type": "a mapping",
    "model_attributes_type": "a mapping",
    "list_type": "a list",
    "tuple_type": "a list",
}


def _loc_path(loc: tuple[Any, ...]) -> str:
    path = "spec"
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        else:
            path += f".{part}"
    return path


def _unwrap(tp: Any) -> Any:
    """Strip Annotated/Optional around a field type."""
    while True:
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp = typing.get_args(tp)[0]
            continue
        if origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(args) == 1:
                tp = args[0]
                continue
        return tp


def _model_at(model: type[BaseModel], loc: tuple[Any, ...]) -> type[BaseModel] | None:
    """The model class that holds the field at ``loc`` (loc of the parent object)."""
    tp: Any = model
    for part in loc:
        tp = _unwrap(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            found = None
            for fname, f in tp.model_fields.items():
                if (f.alias or fname) == part:
                    found = f.annotation
                    break
            if found is None:
                return None
            tp = found
        else:
            origin = typing.get_origin(tp)
            args = typing.get_args(tp)
            if origin in (list, tuple) and args:
                tp = args[0]
            elif origin is dict and len(args) == 2:
                tp = args[1]
            else:
                return None
    tp = _unwrap(tp)
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return tp
    return None


def field_names(model: type[BaseModel]) -> list[str]:
    """The YAML (camelCase) names a model accepts."""
    return [f.alias or n for n, f in model.model_fields.items()]


def _pydantic_error(e: Any, model: type[BaseModel], err: Callable[..., ConfigError]) -> ConfigError:
    loc = tuple(e["loc"])
    path = _loc_path(loc)
    etype = e["type"]
    value = e.get("input")
    if etype == "extra_forbidden":
        parent = _model_at(model, loc[:-1])
        allowed = field_names(parent) if parent else []
        close = difflib.get_close_matches(str(loc[-1]), allowed, n=1, cutoff=0.6)
        if close:
            hint = f"did you mean {close[0]!r}?"
        elif allowed:
            hint = "allowed fields here: " + ", ".join(sorted(allowed))
        else:
            hint = "remove it"
        return err(path, f"unknown field {loc[-1]!r}", hint)
    if etype == "missing":
        parent_path = _loc_path(loc[:-1])
        return err(
            path, f"missing required field {loc[-1]!r}", f"add '{loc[-1]}' under {parent_path}"
        )
    if etype == "literal_error":
        expected = e.get("ctx", {}).get("expected", "")
        return err(path, f"invalid value {value!r}", f"must be one of {expected}")
    if etype in _TYPE_WORDS:
        return err(
            path,
            f"expected {_TYPE_WORDS[etype]}, got {_type_name(value)} {value!r}",
            "fix the value's type"
            if not isinstance(value, str)
            else "remove the quotes"
            if etype.startswith(("int", "float", "bool"))
            else "quote the value",
        )
    if etype in ("greater_than_equal", "less_than_equal", "greater_than", "less_than"):
        ctx = e.get("ctx", {})
        bounds = []
        if "ge" in ctx:
            bounds.append(f">= {ctx['ge']}")
        if "le" in ctx:
            bounds.append(f"<= {ctx['le']}")
        return err(
            path,
            f"value {value!r} out of range: must be {' and '.join(bounds)}",
            "use a value in the allowed range",
        )
    if etype == "value_error":
        msg = str(e.get("msg", ""))
        msg = msg.removeprefix("Value error, ")
        hint = ""
        if "duration" in msg:
            hint = "write durations like '1s', '0.5s', '100ms', '1m', '1h'"
        elif "regex" in msg:
            hint = "fix the regular expression (RE2 syntax)"
        elif "only one of" in msg or "cannot both" in msg:
            hint = "keep just one of them"
        elif "between 1-65535" in msg:
            hint = "use a port number from 1 to 65535"
        elif "mode cannot" in msg:
            hint = "change resolution or remove the endpoints"
        return err(path, msg, hint)
    return err(path, str(e.get("msg", "invalid value")), "")
