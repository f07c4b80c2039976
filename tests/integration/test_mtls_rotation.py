"""Certificate and root rotation in a running mesh, under steady load, with no failed request.

Workload certificates live ~2 min here, so sidecars renew every few seconds; midway the CA
rotates its root in two phases (announce in the trust bundle, sign later). Traffic between two
sidecars (STRICT mTLS, so nothing can fall back to plaintext) must not see a single failure,
and afterwards the server presents a certificate from the new root.
"""

from __future__ import annotations

import socket
import ssl
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509

from diktyo.control.ca import authority
from diktyo.platform.harness import MeshThread
from diktyo.testing import eventually_sync, hello_front_mesh

pytestmark = [pytest.mark.slow, pytest.mark.timeout(120)]

APPS = Path(__file__).parent.parent / "e2e" / "apps"
STRICT = """
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: hello-strict, namespace: default}
spec:
  selector: {matchLabels: {app: hello}}
  mtls: {mode: STRICT}
"""
# one request per connection: every request is a fresh mTLS handshake with the current certs
ONE_REQUEST_PER_CONNECTION = """
apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: hello, namespace: default}
spec:
  host: hello
  trafficPolicy:
    connectionPool: {http: {maxRequestsPerConnection: 1}}
"""
_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def mesh_file(tmp: Path) -> Path:
    f = tmp / "mesh.yaml"
    app = APPS / "tiny_app.py"
    f.write_text(hello_front_mesh("rotation", app, app))
    return f


def workload(mesh: MeshThread, name: str) -> dict[str, Any]:
    return next(w for w in mesh.describe()["workloads"] if w["workload"] == name)


def presented_certificate(port: int) -> x509.Certificate:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    der = b""
    with socket.create_connection(("127.0.0.1", port), 5) as raw:
        try:
            with ctx.wrap_socket(raw) as tls:
                der = tls.getpeercert(binary_form=True) or b""
        except (ssl.SSLError, ConnectionError):
            pass  # STRICT may drop us after the handshake (no client certificate)
    assert der, "no certificate presented"
    return x509.load_der_x509_certificate(der)


def test_renewals_and_root_rotation_under_load_fail_no_request(tmp_path: Path, monkeypatch) -> None:
    generate = authority.CertificateAuthority.generate.__func__  # type: ignore[attr-defined]

    def short_lived(cls, *args: Any, **kwargs: Any):  # type: ignore[no-untyped-def]
        # valid from 60 s back (clock skew) to 66 s ahead: renewal at half of that, ~3 s ahead
        kwargs["workload_lifetime"] = 66
        return generate(cls, *args, **kwargs)

    monkeypatch.setattr(authority.CertificateAuthority, "generate", classmethod(short_lived))
    with MeshThread(mesh_file(tmp_path)) as mesh:
        mesh.apply_text(STRICT)
        mesh.apply_text(ONE_REQUEST_PER_CONNECTION)
        mesh.wait_synced()
        assert mesh.mesh is not None
        identity = mesh.mesh.cp.identity
        front_in = workload(mesh, "front")["inbound_ports"]["9080"]
        hello_in = workload(mesh, "hello")["inbound_ports"]["9080"]
        url = f"http://127.0.0.1:{front_in}/call/hello:9080/x"
        stop = threading.Event()
        results: list[int | str] = []

        def load() -> None:
            while not stop.is_set():
                try:
                    with _opener.open(url, timeout=10) as r:
                        r.read()
                        results.append(r.status)
                except urllib.error.HTTPError as exc:
                    results.append(f"{exc.code}: {exc.read()[:200]!r}")
                except OSError as exc:
                    results.append(repr(exc))
                time.sleep(0.01)  # real time: the load generator's pause

        threads = [threading.Thread(target=load, daemon=True) for _ in range(2)]
        for t in threads:
            t.start()
        try:
            issued0 = identity.service.issued

            def life() -> str:
                leaf0 = presented_certificate(hello_in)
                life = (leaf0.not_valid_after_utc - leaf0.not_valid_before_utc).total_seconds()
                return f"sidecars renewing (leaf life {life} s)"

            eventually_sync(
                lambda: identity.service.issued >= issued0 + 4, timeout=20, interval=0.2, what=life
            )
            old_root = mesh.run(lambda: identity.ca.root_cert)
            # phase 1 now (new root in every bundle at the next renewals), phase 2 in 12 s
            mesh.run(lambda: identity.ca.rotate_root(overlap=120, activate_after=12))
            time.sleep(12.5)  # real time: past the 12 s activate_after of phase 2
            new_root = mesh.run(lambda: identity.ca.root_cert)
            assert new_root != old_root
            issued1 = identity.service.issued
            leaf = presented_certificate(hello_in)

            def switched() -> bool:
                nonlocal leaf
                leaf = presented_certificate(hello_in)
                return leaf.issuer == new_root.subject and identity.service.issued >= issued1 + 4

            eventually_sync(
                switched,
                timeout=25,
                interval=0.5,
                what=lambda: f"hello on the new root ({leaf.issuer}), 4 more leaves issued",
            )
            time.sleep(1.0)  # real time: traffic keeps flowing after the switch
        finally:
            stop.set()
            for t in threads:
                t.join(15)
        assert leaf.issuer == new_root.subject, "hello did not move to the new root"
        failures = [r for r in results if r != 200]
        assert len(results) > 100
        assert failures == [], failures[:5]
