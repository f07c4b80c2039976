"""SPIFFE identities: ``spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>``."""

from __future__ import annotations

from dataclasses import dataclass

# the environment variable a platform hands a sidecar its CA bootstrap token in
TOKEN_ENV = "DIKTYO_CA_TOKEN"
# what the local platform sets instead: the path of a 0600 file holding that token (the
# environment of a process is readable in /proc/PID/environ, a 0600 file only by its owner)
TOKEN_FILE_ENV = "DIKTYO_CA_TOKEN_FILE"

SCHEME = "spiffe://"


class SpiffeError(ValueError):
    """A string that is not a SPIFFE id of Istio's form."""


@dataclass(frozen=True, slots=True)
class SpiffeId:
    trust_domain: str
    namespace: str
    service_account: str

    @property
    def uri(self) -> str:
        return f"{SCHEME}{self.trust_domain}/ns/{self.namespace}/sa/{self.service_account}"

    @property
    def principal(self) -> str:
        """Istio's principal form, as written in AuthorizationPolicy (no ``spiffe://``)."""
        return self.uri[len(SCHEME) :]

    def __str__(self) -> str:
        return self.uri

    @classmethod
    def parse(cls, value: str) -> SpiffeId:
        """Parse ``spiffe://td/ns/NS/sa/SA`` (the ``spiffe://`` prefix is optional)."""
        rest = value.removeprefix(SCHEME)
        parts = rest.split("/")
        if (
            len(parts) != 5
            or parts[1] != "ns"
            or parts[3] != "sa"
            or not all(parts[i] for i in (0, 2, 4))
        ):
            raise SpiffeError(
                f"{value!r} is not a SPIFFE id of the form "
                "spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>"
            )
        return cls(parts[0], parts[2], parts[4])


def spiffe_uri(trust_domain: str, namespace: str, service_account: str) -> str:
    return SpiffeId(trust_domain, namespace, service_account).uri


def to_principal(value: str) -> str:
    """``spiffe://cluster.local/ns/a/sa/b`` -> ``cluster.local/ns/a/sa/b`` (idempotent)."""
    return value.removeprefix(SCHEME)


def namespace_of(principal: str) -> str:
    """The namespace inside a principal, ``""`` when it has none."""
    parts = to_principal(principal).split("/")
    for i in range(len(parts) - 1):
        if parts[i] == "ns":
            return parts[i + 1]
    return ""
