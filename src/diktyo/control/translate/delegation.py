"""Delegation: a root VirtualService route with ``delegate`` takes the HTTP routes of a delegate
VirtualService (one without ``hosts``), merged as Istio merges them.

Theory of operation (Istio's ``mergeVirtualServicesIfNeeded``):

- The delegate is looked up by ``name`` and ``namespace`` (default: the root's namespace). It
  must have no hosts and be exported to the root's namespace (``exportTo`` empty or ``*``, or
  naming that namespace; ``.`` is the delegate's own). Otherwise the root route is dropped.
- Each delegate route becomes one route in place of the root route, in the delegate's order.
- Matches: every delegate match must be a subset of at least one root match; it is merged
  with each root match it does not conflict with (delegate fields win; headers, query
  params, withoutHeaders and sourceLabels are united). A delegate route with a match that
  fits no root match is dropped. With no root matches, the delegate's are used as they are;
  with no delegate matches, the root's.
- Conflicts: a regex on one side with any string match on the other; two different exact
  values; an exact root with a prefix delegate; a delegate prefix/exact that does not start
  with the root prefix; different ``ignoreUriCase``; different ports; a different
  ``sourceNamespace``; different sourceLabels values; delegate gateways not all in the root's.
- Inherited: name (``root-delegate`` when both are named), rewrite, directResponse, timeout,
  retries, fault, mirror(s), mirror percentage, corsPolicy and headers come from the root
  route when the delegate route does not set them.
- Destinations keep the namespace of the VirtualService that wrote them (Istio resolves short
  names before merging), so ``reviews`` in a delegate in ``ns2`` is ``reviews.ns2``.
"""

from __future__ import annotations

from typing import Any

from diktyo.control.translate.hosts import resolve_host

# fields of an HTTPRoute a delegate route inherits from the root route when it has none
_INHERITED = (
    "rewrite",
    "direct_response",
    "timeout",
    "retries",
    "fault",
    "mirror",
    "mirror_percent",
    "mirror_percent_legacy",
    "mirror_percentage",
    "cors_policy",
    "headers",
)


def delegate_key(delegate: Any, root_namespace: str) -> tuple[str, str]:
    """``(namespace, name)`` of the delegate a root route names."""
    return (delegate.namespace or root_namespace, delegate.name or "")


def exported_to(vs: Any, namespace: str) -> bool:
    """Is VirtualService ``vs`` visible from ``namespace`` (its ``exportTo``; empty = all)?"""
    export = vs.spec.export_to
    if not export:
        return True
    names = {vs.namespace if e == "." else e for e in export}
    return "*" in names or namespace in names


def find_delegate(
    delegates: dict[tuple[str, str], Any], root: Any, rule: Any
) -> tuple[Any | None, str]:
    """The delegate VirtualService of ``rule`` (a root route), or None and why not."""
    key = delegate_key(rule.delegate, root.namespace)
    dvs = delegates.get(key)
    if dvs is None:
        return None, f"delegate VirtualService {key[0]}/{key[1]} not found"
    if not exported_to(dvs, root.namespace):
        return None, (
            f"delegate VirtualService {key[0]}/{key[1]} is not exported to namespace "
            f"{root.namespace} (exportTo {dvs.spec.export_to})"
        )
    return dvs, ""


def resolve_destinations(rule: Any, namespace: str, services: Any) -> Any:
    """``rule`` with every destination host (route, mirror, mirrors) as an FQDN of ``namespace``."""

    def fix(dest: Any) -> Any:
        return dest.model_copy(update={"host": resolve_host(dest.host, namespace, services)})

    update: dict[str, Any] = {}
    if rule.route:
        update["route"] = [
            rd.model_copy(update={"destination": fix(rd.destination)}) for rd in rule.route
        ]
    if rule.mirror is not None:
        update["mirror"] = fix(rule.mirror)
    if rule.mirrors:
        update["mirrors"] = [
            mp.model_copy(update={"destination": fix(mp.destination)}) for mp in rule.mirrors
        ]
    return rule.model_copy(update=update) if update else rule


def merge_route(root: Any, leaf: Any) -> Any | None:
    """The delegate route ``leaf`` merged under root route ``root``; None on a match conflict."""
    matches, conflict = merge_matches(list(root.match), list(leaf.match))
    if conflict:
        return None
    update: dict[str, Any] = {"match": matches, "delegate": None}
    if not leaf.name:
        update["name"] = root.name
    elif root.name:
        update["name"] = f"{root.name}-{leaf.name}"
    for f in _INHERITED:
        if getattr(leaf, f) is None and getattr(root, f) is not None:
            update[f] = getattr(root, f)
    if not leaf.mirrors and root.mirrors:
        update["mirrors"] = list(root.mirrors)
    return leaf.model_copy(update=update)


def merge_matches(root: list[Any], leaf: list[Any]) -> tuple[list[Any], bool]:
    """Merged match list and whether the delegate's matches conflict with the root's."""
    if not root:
        return leaf, False
    if not leaf:
        return root, False
    out: list[Any] = []
    for sub in leaf:
        found = False
        for rm in root:
            if has_conflict(rm, sub):
                continue
            out.append(merge_match(rm, sub))
            found = True
        if not found:
            return [], True
    return out, not out


def merge_match(root: Any, leaf: Any) -> Any:
    update: dict[str, Any] = {}
    if not leaf.name:
        update["name"] = root.name
    elif root.name:
        update["name"] = f"{root.name}-{leaf.name}"
    for f in ("uri", "scheme", "method", "authority"):
        if getattr(leaf, f) is None:
            update[f] = getattr(root, f)
    for f in ("headers", "without_headers", "query_params", "source_labels"):
        update[f] = {**getattr(root, f), **getattr(leaf, f)}
    if not leaf.port:
        update["port"] = root.port
    if not leaf.source_namespace:
        update["source_namespace"] = root.source_namespace
    if not leaf.gateways:
        update["gateways"] = list(root.gateways)
    if not leaf.stat_prefix:
        update["stat_prefix"] = root.stat_prefix
    return leaf.model_copy(update=update)


def has_conflict(root: Any, leaf: Any) -> bool:
    """Is ``leaf`` (a delegate match) not a subset of ``root`` (a root match)?"""
    for f in ("uri", "scheme", "method", "authority"):
        if string_match_conflict(getattr(root, f), getattr(leaf, f)):
            return True
    for f in ("headers", "without_headers", "query_params"):
        mine = getattr(root, f)
        for key, value in getattr(leaf, f).items():
            if string_match_conflict(mine.get(key), value):
                return True
    if root.ignore_uri_case != leaf.ignore_uri_case:
        return True
    if root.port and leaf.port and root.port != leaf.port:
        return True
    if root.source_namespace and leaf.source_namespace != root.source_namespace:
        return True
    for key, value in leaf.source_labels.items():
        if key in root.source_labels and root.source_labels[key] != value:
            return True
    if root.gateways and leaf.gateways:
        if len(root.gateways) < len(leaf.gateways):
            return True
        if any(g not in root.gateways for g in leaf.gateways):
            return True
    return False


def string_match_conflict(root: Any, leaf: Any) -> bool:
    """Istio's rule for one StringMatch pair (an empty string counts as unset, as in protobuf)."""
    if root is None or leaf is None:
        return False
    r_exact, r_prefix, r_regex = root.exact or "", root.prefix or "", root.regex or ""
    l_exact, l_prefix, l_regex = leaf.exact or "", leaf.prefix or "", leaf.regex or ""
    if r_regex and (l_regex or l_prefix or l_exact):
        return True
    if l_regex and (r_regex or r_prefix or r_exact):
        return True
    if r_exact:
        return bool(l_prefix) or l_exact != r_exact
    if r_prefix:
        if l_prefix:
            return not l_prefix.startswith(r_prefix)
        if l_exact:
            return not l_exact.startswith(r_prefix)
    return True
