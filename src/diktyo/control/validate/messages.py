"""Messages: the catalogue of analysis codes (Istio's IST codes, diktyo's DKT codes) and Finding.

Istio's codes, names, levels and message texts follow its analysis message reference
(https://istio.io/latest/docs/reference/config/analysis/). Checks that Istio does not have
carry a ``DKT`` code (diktyo-only), listed after Istio's in ``CATALOGUE``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from diktyo.api.errors import ConfigError

Level = Literal["Error", "Warning", "Info"]
DOCS_URL = "https://istio.io/latest/docs/reference/config/analysis"
DIKTYO_DOCS = "docs/analyze.md"
_SEVERITY: dict[str, Literal["error", "warning", "info"]] = {
    "Error": "error",
    "Warning": "warning",
    "Info": "info",
}
LEVELS: tuple[Level, ...] = ("Info", "Warning", "Error")


@dataclass(frozen=True, slots=True)
class MessageType:
    code: str
    name: str
    level: Level
    description: str

    @property
    def documentation_url(self) -> str:
        if self.code.startswith("IST"):
            return f"{DOCS_URL}/{self.code.lower()}/?ref=diktyo-analyze"
        return f"{DIKTYO_DOCS}#{self.code.lower()}"


def _m(code: str, name: str, level: Level, description: str) -> MessageType:
    return MessageType(code, name, level, description)


# Istio's messages that diktyo reports (the ones that need only Istio kinds and Services).
DEPRECATED = _m("IST0002", "Deprecated", "Warning", "A feature the config uses is deprecated.")
REFERENCED_RESOURCE_NOT_FOUND = _m(
    "IST0101", "ReferencedResourceNotFound", "Error", "A resource being referenced does not exist."
)
SCHEMA_VALIDATION_ERROR = _m(
    "IST0106", "SchemaValidationError", "Error", "The resource has a schema validation error."
)
CONFLICTING_MESH_GATEWAY_VS_HOSTS = _m(
    "IST0109",
    "ConflictingMeshGatewayVirtualServiceHosts",
    "Error",
    "Conflicting hosts on VirtualServices associated with the mesh gateway.",
)
CONFLICTING_SIDECAR_WORKLOAD_SELECTORS = _m(
    "IST0110",
    "ConflictingSidecarWorkloadSelectors",
    "Error",
    "A Sidecar resource selects the same workloads as another Sidecar resource.",
)
MULTIPLE_SIDECARS_WITHOUT_SELECTORS = _m(
    "IST0111",
    "MultipleSidecarsWithoutWorkloadSelectors",
    "Error",
    "More than one Sidecar resource in a namespace has no workload selector.",
)
VS_DESTINATION_PORT_SELECTOR_REQUIRED = _m(
    "IST0112",
    "VirtualServiceDestinationPortSelectorRequired",
    "Error",
    "A VirtualService routes to a service with more than one port but does not say which.",
)
PORT_NAME_NOT_UNDER_CONVENTION = _m(
    "IST0118",
    "PortNameIsNotUnderNamingConvention",
    "Info",
    "A Service port name does not follow Istio's naming convention; the protocol is sniffed.",
)
NO_SERVER_CERT_VERIFICATION_DESTINATION = _m(
    "IST0128",
    "NoServerCertificateVerificationDestinationLevel",
    "Warning",
    "No caCertificates are set in a DestinationRule: the server certificate is not verified.",
)
NO_SERVER_CERT_VERIFICATION_PORT = _m(
    "IST0129",
    "NoServerCertificateVerificationPortLevel",
    "Warning",
    "No caCertificates are set for a port in a DestinationRule: the server certificate of "
    "traffic to that port is not verified.",
)
VS_UNREACHABLE_RULE = _m(
    "IST0130",
    "VirtualServiceUnreachableRule",
    "Warning",
    "A VirtualService rule is never used because an earlier rule matches the same requests.",
)
VS_INEFFECTIVE_MATCH = _m(
    "IST0131",
    "VirtualServiceIneffectiveMatch",
    "Info",
    "A VirtualService rule match duplicates a match of an earlier rule.",
)
VS_HOST_NOT_FOUND_IN_GATEWAY = _m(
    "IST0132",
    "VirtualServiceHostNotFoundInGateway",
    "Warning",
    "A host of a VirtualService is not served by the Gateway it is bound to.",
)
SERVICE_ENTRY_ADDRESSES_REQUIRED = _m(
    "IST0134",
    "ServiceEntryAddressesRequired",
    "Warning",
    "Virtual IP addresses are required for ports serving TCP (or unset) protocol.",
)
INGRESS_ROUTE_RULES_NOT_AFFECTED = _m(
    "IST0140",
    "IngressRouteRulesNotAffected",
    "Warning",
    "Subset routing of a host in one VirtualService has no effect on gateway requests that "
    "another VirtualService routes to that host without a subset.",
)
GATEWAY_DUPLICATE_CERTIFICATE = _m(
    "IST0138",
    "GatewayDuplicateCertificate",
    "Warning",
    "The same certificate in several gateways may cause 404s when clients reuse HTTP/2 "
    "connections.",
)
CONFLICTING_GATEWAYS = _m(
    "IST0145",
    "ConflictingGateways",
    "Error",
    "Gateways with the same selector and port serve overlapping hosts.",
)
EXTERNAL_NAME_INVALID_PORT_NAME = _m(
    "IST0150",
    "ExternalNameServiceTypeInvalidPortName",
    "Warning",
    "A port of an ExternalName Service has no protocol in its name; TCP traffic to it may not "
    "be forwarded correctly.",
)
CONFLICTING_TELEMETRY_WORKLOAD_SELECTORS = _m(
    "IST0159",
    "ConflictingTelemetryWorkloadSelectors",
    "Error",
    "A Telemetry resource selects the same workloads as another Telemetry resource.",
)
MULTIPLE_TELEMETRIES_WITHOUT_SELECTORS = _m(
    "IST0160",
    "MultipleTelemetriesWithoutWorkloadSelectors",
    "Error",
    "More than one Telemetry resource in a namespace has no workload selector.",
)
UNKNOWN_DESTINATION_RULE_HOST = _m(
    "IST0174",
    "UnknownDestinationRuleHost",
    "Warning",
    "The host of a DestinationRule does not match any service in the mesh.",
)
CONFLICTING_SERVICE_ENTRY_PROTOCOL = _m(
    "IST0177",
    "ConflictingServiceEntryProtocol",
    "Warning",
    "ServiceEntries define the same host and port with different protocols.",
)

# diktyo-only checks (Istio has no message for them)
FILE_PARSE_ERROR = _m(
    "DKT0001", "FileParseError", "Error", "A file cannot be read or is not valid YAML."
)
RESOURCE_IGNORED = _m(
    "DKT0002", "ResourceIgnored", "Warning", "A document or field is read but not used."
)
DIKTYO_CHECK = _m(
    "DKT0100",
    "DiktyoCheck",
    "Warning",
    "A diktyo check without a code of its own (its level is given with each message).",
)
DUPLICATE_RESOURCE = _m(
    "DKT0101",
    "DuplicateResource",
    "Error",
    "Two documents define the same kind, namespace and name; the later one replaces the first.",
)
ROUTE_WEIGHTS = _m(
    "DKT0102", "RouteWeights", "Error", "Destination weights are out of range or do not sum to 100."
)
CONFLICTING_DESTINATION_RULES = _m(
    "DKT0103",
    "ConflictingDestinationRules",
    "Warning",
    "Several DestinationRules for one host: only the first one's traffic policy applies.",
)
FAULT_NEVER_INJECTED = _m(
    "DKT0104",
    "FaultNeverInjected",
    "Warning",
    "A fault without percentage is never injected (as in Istio).",
)
UNSUPPORTED = _m(
    "DKT0105",
    "UnsupportedByDiktyo",
    "Warning",
    "Istio accepts this, but diktyo does not serve it yet; it is ignored.",
)
GATEWAY_API_CONDITION = _m(
    "DKT0106",
    "GatewayAPICondition",
    "Error",
    "A Gateway API route or listener would have a False status condition (Accepted, "
    "ResolvedRefs) in Istio; diktyo has no status to write, so analyze reports it.",
)
VIRTUAL_SERVICE_DELEGATION = _m(
    "DKT0107",
    "VirtualServiceDelegation",
    "Warning",
    "A route delegates to a VirtualService that is missing or not exported, or a delegate's "
    "route can never apply within the root route's match.",
)

CATALOGUE: tuple[MessageType, ...] = tuple(
    sorted(
        (v for v in list(globals().values()) if isinstance(v, MessageType)),
        key=lambda m: (not m.code.startswith("IST"), m.code),
    )
)
BY_CODE: dict[str, MessageType] = {m.code: m for m in CATALOGUE}


@dataclass(frozen=True, slots=True)
class Finding(ConfigError):
    """One analysis message, located like a ConfigError and coded like istioctl's messages.

    ``str()`` gives istioctl's line, with diktyo's ``file:line:col`` and hint::

        Error [IST0101] (VirtualService default/reviews f.yaml:12:5) Referenced host not found: "x"
    """

    code: str = ""
    name: str = ""
    kind: str = ""
    namespace: str = ""
    resource: str = ""

    @property
    def level(self) -> Level:
        return {"error": "Error", "warning": "Warning", "info": "Info"}[self.severity]  # type: ignore[return-value]  # dict values are Levels

    @property
    def origin(self) -> str:
        if not self.kind:
            return ""
        return (
            f"{self.kind} {self.namespace}/{self.resource}"
            if self.namespace
            else (f"{self.kind} {self.resource}")
        )

    @property
    def reference(self) -> str:
        if not self.file:
            return ""
        return f"{self.file}:{self.line}:{self.col}" if self.line else self.file

    @property
    def documentation_url(self) -> str:
        mt = BY_CODE.get(self.code)
        return mt.documentation_url if mt else ""

    def __str__(self) -> str:
        where = " ".join(p for p in (self.origin, self.reference) if p)
        text = f"{self.level} [{self.code}]"
        if where:
            text += f" ({where})"
        text += f" {self.message}"
        if self.hint:
            text += f" (hint: {self.hint})"
        return text

    def to_json(self) -> dict[str, object]:
        """istioctl's fields (code, level, origin, reference, message, documentationUrl) plus
        diktyo's (file, line, column, severity, field, hint, name)."""
        out: dict[str, object] = {
            "code": self.code,
            "level": self.level,
            "origin": self.origin,
            "reference": self.reference,
            "message": self.message,
            "documentationUrl": self.documentation_url,
            "name": self.name,
        }
        out.update(
            {
                "file": self.file,
                "line": self.line,
                "column": self.col,
                "severity": self.severity,
                "field": self.field,
                "hint": self.hint,
            }
        )
        return out


def finding(
    mt: MessageType,
    res: Any,
    path: str,
    message: str,
    hint: str = "",
    level: Level | None = None,
) -> Finding:
    """A Finding of type ``mt`` about resource ``res`` at field ``path``."""
    line, col = res.position(path) if res is not None else (0, 0)
    return Finding(
        file=getattr(res, "file", "") or "",
        line=line,
        col=col,
        field=path,
        message=message,
        hint=hint,
        severity=_SEVERITY[level or mt.level],
        code=mt.code,
        name=mt.name,
        kind=getattr(res, "kind", ""),
        namespace=getattr(res, "namespace", ""),
        resource=getattr(res, "name", ""),
    )


_PARSE_PREFIXES = (
    "YAML syntax error",
    "YAML error",
    "cannot read file",
    "a document must be a mapping",
    "duplicate key",
    "file is not",
)


# Error findings about things that appear by themselves later (a service or workload that
# registers when it starts, a Gateway applied next): an apply reports them but is not refused
# for them, as Istio accepts such config and only `istioctl analyze` reports it.
_REGISTRY_DEPENDENT = (
    "Referenced host not found",
    "Referenced host:port not found",
    "Referenced selector not found",
    "Referenced gateway not found",
)


def rejects_apply(finding: Any) -> bool:
    """Does this finding refuse an apply? Errors do, except registry-dependent references."""
    if str(getattr(finding, "severity", "error")).lower() != "error":
        return False
    return not str(getattr(finding, "message", "")).startswith(_REGISTRY_DEPENDENT)


def is_parse_error(err: ConfigError) -> bool:
    """A load error that means the file could not be parsed at all (istioctl's exit code 65)."""
    return err.severity == "error" and err.message.startswith(_PARSE_PREFIXES)


def from_load_error(err: ConfigError, origin: tuple[str, str, str] | None = None) -> Finding:
    """A loader error as a Finding: IST0106 for schema errors, DKT0001 for unparseable files,
    DKT0002 for documents that are read but ignored (warnings and notes). ``origin`` is the
    ``(kind, namespace, name)`` of the document, when known."""
    if isinstance(err, Finding):
        return err
    if is_parse_error(err):
        mt = FILE_PARSE_ERROR
    elif err.severity == "error":
        mt = SCHEMA_VALIDATION_ERROR
    else:
        mt = RESOURCE_IGNORED
    message = err.message
    if mt is SCHEMA_VALIDATION_ERROR:
        message = f"Schema validation error: {err.field + ': ' if err.field else ''}{message}"
    return Finding(
        file=err.file,
        line=err.line,
        col=err.col,
        field=err.field,
        message=message,
        hint=err.hint,
        severity=err.severity,
        code=mt.code,
        name=mt.name,
        kind=origin[0] if origin else "",
        namespace=origin[1] if origin else "",
        resource=origin[2] if origin else "",
    )
