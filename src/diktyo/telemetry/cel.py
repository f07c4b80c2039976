"""A small CEL (Common Expression Language) subset for access log filters (Telemetry API).

Istio's ``accessLogging[].filter.expression`` is a CEL expression over Envoy's request
attributes, e.g. ``response.code >= 400`` or ``request.headers['x-debug'] == 'true'``. This
module compiles the subset Istio's docs use into a Python predicate; anything outside it is
a :class:`CelError` at compile time, so it is reported before a sidecar ever sees it.

Supported:
- literals: integers, doubles, 'single' / "double" quoted strings, true, false, null, lists
- attributes (Envoy's names): see :data:`ATTRIBUTES`; maps (``request.headers``) indexed with
  ``[...]`` or tested with ``'key' in map``
- operators: ``== != < <= > >= in && || !`` and parentheses, unary minus on numbers
- methods: ``startsWith endsWith contains matches`` (RE2 syntax), ``size()``; function
  ``has(map.key)`` is not CEL for maps in Envoy and is not supported, use ``'key' in map``

Evaluation follows Envoy: an error (missing map key, comparing a number with a string) makes
the filter false, so the entry is not logged.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any

# attribute path -> kind ("int", "string", "bool", "map")
ATTRIBUTES: dict[str, str] = {
    "request.path": "string",
    "request.url_path": "string",
    "request.host": "string",
    "request.scheme": "string",
    "request.method": "string",
    "request.headers": "map",
    "request.referer": "string",
    "request.useragent": "string",
    "request.id": "string",
    "request.protocol": "string",
    "request.query": "string",
    "request.size": "int",
    "request.total_size": "int",
    "response.code": "int",
    "response.flags": "string",
    "response.grpc_status": "string",
    "response.size": "int",
    "response.total_size": "int",
    "source.address": "string",
    "source.port": "int",
    "destination.address": "string",
    "destination.port": "int",
    "upstream.address": "string",
    "upstream.port": "int",
    "connection.mtls": "bool",
    "xds.cluster_name": "string",
    "xds.route_name": "string",
}

Activation = Mapping[str, Any]  # attribute path -> value
Predicate = Callable[[Activation], bool]


class CelError(ValueError):
    """An expression outside the supported subset, or malformed."""


class _EvalError(Exception):
    pass


_TOKEN = re.compile(
    r"""\s*(?:
    (?P<num>\d+\.\d+|\d+)u?
    |(?P<str>'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")
    |(?P<op>==|!=|<=|>=|&&|\|\||[<>!()\[\].,-])
    |(?P<id>[A-Za-z_][A-Za-z0-9_]*)
    )""",
    re.VERBOSE,
)


def _tokens(text: str) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    pos = 0
    text = text.rstrip()
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None or m.end() == pos:
            raise CelError(f"unexpected character {text[pos:].lstrip()[:1]!r} at {pos + 1}")
        pos = m.end()
        if m.group("num") is not None:
            n = m.group("num")
            out.append(("lit", float(n) if "." in n else int(n)))
        elif m.group("str") is not None:
            raw = m.group("str")[1:-1]
            out.append(("lit", re.sub(r"\\(.)", r"\1", raw)))
        elif m.group("op") is not None:
            out.append(("op", m.group("op")))
        else:
            word = m.group("id")
            if word in ("true", "false"):
                out.append(("lit", word == "true"))
            elif word == "null":
                out.append(("lit", None))
            elif word == "in":
                out.append(("op", "in"))
            else:
                out.append(("id", word))
    out.append(("end", None))
    return out


Node = Callable[[Activation], Any]

_COMPARE: dict[str, Callable[[Any, Any], bool]] = {
    "==": lambda a, b: a == b,
    "!=": lambda a, b: a != b,
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
}


class _Parser:
    def __init__(self, text: str) -> None:
        self.toks = _tokens(text)
        self.i = 0

    def peek(self) -> tuple[str, Any]:
        return self.toks[self.i]

    def take(self, kind: str, value: Any = None) -> Any:
        k, v = self.toks[self.i]
        if k != kind or (value is not None and v != value):
            want = value if value is not None else kind
            got = v if k != "end" else "end of expression"
            raise CelError(f"expected {want!r}, got {got!r}")
        self.i += 1
        return v

    def accept(self, value: str) -> bool:
        k, v = self.toks[self.i]
        if k == "op" and v == value:
            self.i += 1
            return True
        return False

    def parse(self) -> Node:
        node = self.or_()
        if self.peek()[0] != "end":
            raise CelError(f"unexpected {self.peek()[1]!r} after a complete expression")
        return node

    def or_(self) -> Node:
        node = self.and_()
        while self.accept("||"):
            left, right = node, self.and_()
            node = _or(left, right)
        return node

    def and_(self) -> Node:
        node = self.cmp()
        while self.accept("&&"):
            left, right = node, self.cmp()
            node = _and(left, right)
        return node

    def cmp(self) -> Node:
        left = self.unary()
        k, v = self.peek()
        if k == "op" and (v in _COMPARE or v == "in"):
            self.i += 1
            right = self.unary()
            if v == "in":
                return _in(left, right)
            return _compare(_COMPARE[v], left, right)
        return left

    def unary(self) -> Node:
        if self.accept("!"):
            inner = self.unary()
            return lambda a: not _bool(inner(a))
        if self.accept("-"):
            k, v = self.peek()
            if k != "lit" or isinstance(v, bool) or not isinstance(v, int | float):
                raise CelError("unary minus only on number literals")
            self.i += 1
            return _const(-v)
        return self.postfix()

    def postfix(self) -> Node:
        node, path = self.primary()
        while True:
            if self.accept("."):
                name = self.take("id")
                if self.accept("("):
                    if path is not None:
                        node, path = _attribute(path), None
                    node = _method(name, node, self.args())
                elif path is not None:
                    path = f"{path}.{name}"
                    node = None  # type: ignore[assignment]  # cleared once consumed
                else:
                    raise CelError(f"field selection .{name} is only supported on attributes")
            elif self.accept("["):
                if path is not None:
                    node = _attribute(path)
                    path = None
                key = self.or_()
                self.take("op", "]")
                node = _index(node, key)
            else:
                break
        if path is not None:
            node = _attribute(path)
        return node

    def args(self) -> list[Node]:
        out: list[Node] = []
        if self.accept(")"):
            return out
        out.append(self.or_())
        while self.accept(","):
            out.append(self.or_())
        self.take("op", ")")
        return out

    def primary(self) -> tuple[Node, str | None]:
        k, v = self.peek()
        if k == "lit":
            self.i += 1
            return _const(v), None
        if k == "id":
            self.i += 1
            if self.accept("("):
                args = self.args()
                return _function(v, args), None
            return None, v  # type: ignore[return-value]  # an attribute path, resolved later
        if self.accept("("):
            node = self.or_()
            self.take("op", ")")
            return node, None
        if self.accept("["):
            items = [] if self.accept("]") else self.args_until("]")
            return (lambda a: [f(a) for f in items]), None
        raise CelError(f"unexpected {v!r}" if k != "end" else "expression ends too early")

    def args_until(self, close: str) -> list[Node]:
        out = [self.or_()]
        while self.accept(","):
            out.append(self.or_())
        self.take("op", close)
        return out


def _const(v: Any) -> Node:
    return lambda a: v


def _bool(v: Any) -> bool:
    if not isinstance(v, bool):
        raise _EvalError(f"expected a bool, got {v!r}")
    return v


def _or(left: Node, right: Node) -> Node:
    def f(a: Activation) -> bool:
        # CEL's commutative || : an error on one side is absorbed by true on the other
        try:
            if _bool(left(a)):
                return True
        except _EvalError:
            if _bool(right(a)):
                return True
            raise
        return _bool(right(a))

    return f


def _and(left: Node, right: Node) -> Node:
    def f(a: Activation) -> bool:
        try:
            if not _bool(left(a)):
                return False
        except _EvalError:
            if not _bool(right(a)):
                return False
            raise
        return _bool(right(a))

    return f


def _compare(op: Callable[[Any, Any], bool], left: Node, right: Node) -> Node:
    def f(a: Activation) -> bool:
        x, y = left(a), right(a)
        if isinstance(x, bool) != isinstance(y, bool) or (
            isinstance(x, str) != isinstance(y, str) and x is not None and y is not None
        ):
            raise _EvalError(f"no such overload: {x!r} vs {y!r}")
        try:
            return op(x, y)
        except TypeError as exc:
            raise _EvalError(str(exc)) from None

    return f


def _in(left: Node, right: Node) -> Node:
    def f(a: Activation) -> bool:
        x, y = left(a), right(a)
        if isinstance(y, Mapping):
            return (x.lower() if isinstance(x, str) else x) in y
        if isinstance(y, list):
            return x in y
        raise _EvalError("'in' needs a list or map")

    return f


def _attribute(path: str) -> Node:
    if path not in ATTRIBUTES:
        root = path.split(".", 1)[0]
        known = sorted(p for p in ATTRIBUTES if p.startswith(root + "."))
        hint = f"; known: {', '.join(known)}" if known else ""
        raise CelError(f"attribute {path!r} is not supported{hint}")

    def f(a: Activation) -> Any:
        if path not in a:
            raise _EvalError(f"no such attribute {path}")
        return a[path]

    return f


def _index(node: Node, key: Node) -> Node:
    def f(a: Activation) -> Any:
        m, k = node(a), key(a)
        if isinstance(m, Mapping):
            k2 = k.lower() if isinstance(k, str) else k  # header maps are lower-case
            if k2 not in m:
                raise _EvalError(f"no such key {k!r}")
            return m[k2]
        if isinstance(m, list) and isinstance(k, int) and not isinstance(k, bool):
            if not 0 <= k < len(m):
                raise _EvalError("index out of range")
            return m[k]
        raise _EvalError("cannot index")

    return f


def _str_method(name: str, fn: Callable[[str, str], bool]) -> Callable[[Node, list[Node]], Node]:
    def make(target: Node, args: list[Node]) -> Node:
        if len(args) != 1:
            raise CelError(f"{name}() takes one argument")
        (arg,) = args

        def f(a: Activation) -> bool:
            s, x = target(a), arg(a)
            if not isinstance(s, str) or not isinstance(x, str):
                raise _EvalError(f"{name} needs strings")
            return fn(s, x)

        return f

    return make


def _matches(target: Node, args: list[Node]) -> Node:
    if len(args) != 1:
        raise CelError("matches() takes one argument")
    (arg,) = args
    cache: dict[str, re.Pattern[str]] = {}

    def f(a: Activation) -> bool:
        s, pat = target(a), arg(a)
        if not isinstance(s, str) or not isinstance(pat, str):
            raise _EvalError("matches needs strings")
        rx = cache.get(pat)
        if rx is None:
            try:
                rx = cache[pat] = re.compile(pat)
            except re.error as exc:
                raise _EvalError(str(exc)) from None
        return rx.search(s) is not None

    return f


def _size(target: Node, args: list[Node]) -> Node:
    if args:
        raise CelError("size() takes no argument")

    def f(a: Activation) -> int:
        v = target(a)
        if not isinstance(v, str | list | Mapping):
            raise _EvalError("size() needs a string, list or map")
        return len(v)

    return f


_METHODS: dict[str, Callable[[Node, list[Node]], Node]] = {
    "startsWith": _str_method("startsWith", str.startswith),
    "endsWith": _str_method("endsWith", str.endswith),
    "contains": _str_method("contains", str.__contains__),
    "matches": _matches,
    "size": _size,
}


def _method(name: str, target: Node, args: list[Node]) -> Node:
    make = _METHODS.get(name)
    if make is None:
        raise CelError(f"method {name}() is not supported (supported: {', '.join(_METHODS)})")
    return make(target, args)


def _function(name: str, args: list[Node]) -> Node:
    if name == "size" and len(args) == 1:
        return _size(args[0], [])
    if name in ("int", "string") and len(args) == 1:
        (arg,) = args
        conv: Callable[[Any], Any] = int if name == "int" else str

        def f(a: Activation) -> Any:
            try:
                return conv(arg(a))
            except (TypeError, ValueError) as exc:
                raise _EvalError(str(exc)) from None

        return f
    raise CelError(f"function {name}() is not supported (supported: size, int, string)")


def compile_filter(expression: str) -> Predicate:
    """Compile ``expression`` into ``predicate(activation) -> bool`` (False on runtime errors).

    Raises :class:`CelError` for expressions outside the supported subset."""
    if not expression.strip():
        raise CelError("empty expression")
    node = _Parser(expression).parse()

    def predicate(a: Activation) -> bool:
        try:
            v = node(a)
        except (_EvalError, re.error):
            return False
        return v is True

    return predicate


def check(expression: str) -> str | None:
    """None if ``expression`` is in the supported subset, else why not."""
    try:
        compile_filter(expression)
    except CelError as exc:
        return str(exc)
    return None
