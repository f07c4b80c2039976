"""Sidecar process entry: load a snapshot (file, config dir or control plane), serve, print the ready line.

When ready it prints one JSON line on stdout, for parents to read the bound ports::

    {"event":"ready","admin":PORT,"listeners":{"NAME":PORT,...},"version":"SNAPSHOT_VERSION",
     "admin_token_file":"PATH"}

``PATH`` holds the bearer token that ``POST /drain`` (and other state-changing admin
endpoints) need; see ``diktyo.proxy.admin``.

Logs go to stderr. SIGTERM / SIGINT / ``POST /drain`` stop accepting, finish in-flight
requests (up to ``drain_timeout``) and exit 0.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import msgspec

from diktyo import _build
from diktyo.proxy import memory
from diktyo.proxy.admin import TOKEN_FILE_ENV as ADMIN_TOKEN_FILE_ENV
from diktyo.proxy.admin import AdminServer, AdminTokenError, resolve_token
from diktyo.proxy.capture import MODES as INTERCEPTION_MODES
from diktyo.proxy.capture import ensure_capture
from diktyo.proxy.sidecar import Sidecar, install_uvloop
from diktyo.security.spiffe import TOKEN_FILE_ENV  # light: CA code loads only with a token
from diktyo.snapshot.codec import SnapshotError, decode
from diktyo.snapshot.model import Snapshot

log = logging.getLogger("diktyo.proxy")


@dataclass
class SidecarOptions:
    snapshot: str | None = None
    config: str | None = None
    control_plane: str | None = None
    node: str | None = None
    admin_port: int = 0
    admin_address: str = "127.0.0.1"
    outbound_port: int | None = None
    drain_timeout: float = 10.0
    header_timeout: float = 30.0  # seconds from a request head's first byte to its end
    accept_http_10: bool = False  # Envoy's accept_http_10 (Istio: PILOT_HTTP10)
    access_log_buffer: int = 1024 * 1024  # bytes of access log buffered before lines drop
    seed: int | None = None
    # Istio's ProxyConfig concurrency: worker processes (None = diktyo's default 1, 0 = one
    # per core); see diktyo.proxy.workers
    concurrency: int | None = None
    # bootstrap token: proves this sidecar's identity to the control plane (snapshots, ACKs)
    # and gets the workload certificate (mTLS). Read from a 0600 file (--token-file, or the
    # path in $DIKTYO_CA_TOKEN_FILE set by the local platform), never from the environment.
    ca_token: str | None = None
    token_file: str | None = field(default_factory=lambda: os.environ.get(TOKEN_FILE_ENV) or None)
    identity_timeout: float = 30.0
    # standalone mode (--config DIR): turns the directory into a snapshot. Given by the caller
    # (``cli.sidecar`` passes ``control.standalone.snapshot_from_dir``), so the proxy layer
    # never imports the control plane.
    config_loader: Callable[[str, int], Snapshot] | None = None

    # Istio's ISTIO_META_INTERCEPTION_MODE: REDIRECT = iptables sends the app's traffic to
    # 15001 / 15006 (diktyo.proxy.capture.ensure_capture); NONE = explicit proxy mode
    interception_mode: str = field(
        default_factory=lambda: os.environ.get("DIKTYO_INTERCEPTION_MODE", "NONE").upper() or "NONE"
    )
    # bearer token file for state-changing admin endpoints ("" = generate one in the state dir)
    admin_token_file: str = field(default_factory=lambda: os.environ.get(ADMIN_TOKEN_FILE_ENV, ""))
    # Kubernetes (set from DIKTYO_* env by diktyo.proxy.env): the kubelet's ports on the pod IP
    status_port: int | None = None  # Istio's 15020: /healthz/ready, /app-health/..., metrics
    readiness_port: int | None = None  # Istio's 15021: /healthz/ready
    status_address: str = "0.0.0.0"
    app_probers: dict[str, dict[str, Any]] = field(default_factory=dict)
    pod_ip: str = "127.0.0.1"  # where app probes go (INSTANCE_IP)
    trust_domain: str | None = None  # expected; a snapshot for another one is logged
    tracing_sampling: float | None = None  # mesh-wide default percent (DIKTYO_TRACING_SAMPLING)
    metadata: dict[str, str] = field(default_factory=dict)  # DIKTYO_META_*
    # the pod's projected service-account token (audience diktyo-ca): the control plane checks
    # it with a TokenReview; used for snapshots/ACKs when there is no bootstrap token
    kube_token_file: str | None = None
    # POD_NAMESPACE and SERVICE_ACCOUNT (downward API): with DIKTYO_TRUST_DOMAIN, the SPIFFE id
    # the workload certificate is asked for with the projected token (as Istio's pilot-agent)
    pod_namespace: str | None = None
    service_account: str | None = None


def override_outbound_port(snapshot: Snapshot, port: int | None) -> Snapshot:
    """Replace the port of the (first) outbound listener, as ``--outbound-port`` asks."""
    if port is None:
        return snapshot
    listeners = []
    done = False
    for lst in snapshot.listeners:
        if lst.direction == "outbound" and not done:
            lst = msgspec.structs.replace(lst, port=port)
            done = True
        listeners.append(lst)
    return msgspec.structs.replace(snapshot, listeners=tuple(listeners))


_WARNED: set[tuple[str, str | None]] = set()


def pod_overrides(snapshot: Snapshot, opts: SidecarOptions) -> Snapshot:
    """The pod's environment applied to a snapshot: ``--outbound-port`` and the mesh-wide
    tracing sampling (Istio's ProxyConfig ``tracing.sampling``; Telemetry resources in the
    snapshot still override it per workload). A trust domain other than the pod expects is
    logged (the control plane's is the one used)."""
    snapshot = override_outbound_port(snapshot, opts.outbound_port)
    mismatch = (snapshot.node.trust_domain, opts.trust_domain)
    if opts.trust_domain and mismatch[0] != mismatch[1] and mismatch not in _WARNED:
        _WARNED.add(mismatch)  # once, not on every push
        log.warning(
            "snapshot %s is for trust domain %r but DIKTYO_TRUST_DOMAIN says %r: the control "
            "plane's is used; check the chart's trustDomain value",
            snapshot.version, snapshot.node.trust_domain, opts.trust_domain,
        )
    if opts.tracing_sampling is not None:
        tracing = msgspec.structs.replace(snapshot.mesh.tracing, sampling=opts.tracing_sampling)
        mesh = msgspec.structs.replace(snapshot.mesh, tracing=tracing)
        snapshot = msgspec.structs.replace(snapshot, mesh=mesh)
    return snapshot


def sidecar_ready(sidecar: Sidecar) -> bool:
    """Serving: a snapshot is applied, every listener is up, and it is not draining."""
    return (
        sidecar.rt is not None
        and not sidecar.draining
        and all(c.server is not None for c in sidecar.listeners.values())
    )


async def start_status(sidecar: Sidecar, opts: SidecarOptions) -> Any:
    """The kubelet's status/readiness ports (``diktyo.proxy.status``), or None if not asked for."""
    if opts.status_port is None and opts.readiness_port is None:
        return None
    from diktyo.proxy.status import StatusServer

    def metrics() -> str:
        clusters = sidecar.rt.clusters if sidecar.rt is not None else {}
        text: str = sidecar.stats.render_prometheus(clusters)
        return text

    status = StatusServer(lambda: sidecar_ready(sidecar), metrics, opts.app_probers, opts.pod_ip)
    await status.start(opts.status_address, opts.status_port, opts.readiness_port)
    return status


def load_snapshot(opts: SidecarOptions) -> Snapshot:
    if opts.snapshot:
        with open(opts.snapshot, "rb") as f:
            data = f.read()
        return ensure_capture(pod_overrides(decode(data), opts), opts.interception_mode)
    if opts.config:
        if opts.config_loader is None:
            raise SnapshotError(
                "--config DIR needs the control plane's translator: start the sidecar with "
                "`diktyo sidecar` or `python -m diktyo.proxy`"
            )
        return ensure_capture(
            opts.config_loader(opts.config, opts.outbound_port or 0), opts.interception_mode
        )
    raise SnapshotError(
        "no snapshot source: pass --snapshot FILE, --config DIR or --control-plane URL --node ID"
    )


async def serve(opts: SidecarOptions, ready_out=sys.stdout) -> int:  # type: ignore[no-untyped-def]
    if opts.interception_mode not in INTERCEPTION_MODES:
        print(
            f"diktyo sidecar: interception mode {opts.interception_mode!r} is not one of "
            f"{', '.join(INTERCEPTION_MODES)} (--interception-mode / DIKTYO_INTERCEPTION_MODE)",
            file=sys.stderr,
        )
        return 2
    sidecar = Sidecar(asyncio.get_running_loop(), seed=opts.seed)
    sidecar.header_timeout = opts.header_timeout
    sidecar.accept_http_10 = opts.accept_http_10
    sidecar.access_log_buffer = opts.access_log_buffer
    if opts.control_plane and not opts.node:
        print(
            "diktyo sidecar: --control-plane needs --node ID (the node id the control "
            "plane knows this sidecar by)",
            file=sys.stderr,
        )
        return 2
    if opts.ca_token is None and opts.token_file:
        from diktyo.security.admin_token import read_secret_file

        try:
            opts.ca_token = read_secret_file(opts.token_file)
        except ValueError as exc:
            print(f"diktyo sidecar: bootstrap token: {exc}", file=sys.stderr)
            return 2
    # the admin credential: a 0600 file given, or one generated into the state dir
    try:
        token, token_path, created = resolve_token(opts.admin_token_file)
    except (AdminTokenError, OSError) as exc:
        print(f"diktyo sidecar: {exc}", file=sys.stderr)
        return 1
    try:
        return await _serve(opts, ready_out, sidecar, token, token_path)
    finally:
        if created and not opts.admin_token_file and token_path is not None:
            _remove_token(token_path)


async def _serve(  # type: ignore[no-untyped-def]  # ready_out: any text stream
    opts: SidecarOptions, ready_out, sidecar: Sidecar, token: str, token_path: str | None
) -> int:
    loop = asyncio.get_running_loop()
    client = None
    # the admin port answers first (/ready is 503 until a snapshot is applied)
    admin = AdminServer(sidecar, token, str(token_path) if token_path else "")
    await admin.start(opts.admin_address, opts.admin_port)
    try:
        status = await start_status(sidecar, opts)
    except OSError as exc:
        admin.close()
        print(f"diktyo sidecar: cannot open the status/readiness ports on "
              f"{opts.status_address}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    kube_identity = kube_spiffe_id(opts) if opts.control_plane and not opts.ca_token else None
    kube_token = ""
    if kube_identity is not None:
        assert opts.kube_token_file is not None
        try:
            kube_token = read_kube_token(opts.kube_token_file)
        except OSError as exc:
            print(f"diktyo sidecar: cannot read the service-account token "
                  f"{opts.kube_token_file}: {exc.strerror or exc}", file=sys.stderr)
            admin.close()
            if status is not None:
                status.close()
            await sidecar.stop()
            return 1
    if opts.control_plane and (opts.ca_token or kube_token):
        error = await start_identity(
            sidecar, opts.control_plane, opts.ca_token or kube_token, opts.identity_timeout,
            spiffe_id=kube_identity,
        )
        if error:
            print(f"diktyo sidecar: {error}", file=sys.stderr)
            admin.close()
            if status is not None:
                status.close()
            await sidecar.stop()
            return 1
    workers = start_workers(sidecar, opts)
    if opts.control_plane:
        from diktyo.proxy.config_client import ConfigClient

        ready_evt = asyncio.Event()

        async def on_snapshot(snap: Snapshot) -> None:
            sidecar.apply(ensure_capture(pod_overrides(snap, opts), opts.interception_mode))
            try:
                if workers is not None:  # ACKed once every worker serves it too
                    await sidecar.wait_listening()
                    await workers.push()
            finally:
                ready_evt.set()

        assert opts.node is not None  # checked above: --control-plane needs --node
        cp_token = opts.ca_token
        if cp_token is None and opts.kube_token_file:
            try:
                cp_token = read_kube_token(opts.kube_token_file)
            except OSError as exc:
                print(f"diktyo sidecar: cannot read the service-account token "
                      f"{opts.kube_token_file}: {exc.strerror or exc}", file=sys.stderr)
                admin.close()
                if status is not None:
                    status.close()
                await sidecar.stop()
                return 1
        client = ConfigClient(opts.control_plane, opts.node, on_snapshot, token=cp_token)
        sidecar.control_plane = client  # a path otlp_endpoint is on the replica it talks to
        client.start()
        if opts.ca_token is None and opts.kube_token_file:
            sidecar._spawn(_refresh_kube_token(
                client, opts.kube_token_file, getattr(sidecar, "rotator", None)))
        await ready_evt.wait()
    else:
        try:
            snap = load_snapshot(opts)
        except (SnapshotError, OSError):
            raise
        except Exception as exc:
            where = opts.config or opts.snapshot
            raise SnapshotError(
                f"cannot load config from {where}: {type(exc).__name__}: {exc}"
            ) from exc
        sidecar.apply(snap)
        await sidecar.wait_listening()
        if workers is not None:
            try:
                await workers.push()
            except RuntimeError as exc:  # the leader serves; those workers are restarted
                log.error("%s", exc)
    await sidecar.wait_listening()
    memory.settle_gc()  # collect, freeze the config, then a high gen-0 threshold
    version = sidecar.rt.snapshot.version if sidecar.rt is not None else ""
    ready = {
        "event": "ready",
        "admin": admin.port,
        "listeners": sidecar.ports(),
        "version": version,
        "admin_token_file": str(token_path) if token_path else None,
        "compiled": bool(_build.status()["compiled"]),  # the mypyc hot path, or pure Python
    }
    if status is not None:
        ready["status"] = status.status_port
        ready["readiness"] = status.readiness_port
    if workers is not None:
        ready["workers"] = [w["pid"] for w in workers.describe()]
    line = json.dumps(ready, separators=(",", ":"))
    print(line, file=ready_out, flush=True)
    log.info("sidecar ready: %s", line)

    def on_signal() -> None:
        task = loop.create_task(sidecar.drain(opts.drain_timeout))
        sidecar.tasks.add(task)

    for sig in (signal.SIGTERM, signal.SIGINT):
        try:
            loop.add_signal_handler(sig, on_signal)
        except (NotImplementedError, RuntimeError):  # pragma: no cover
            pass
    await sidecar.stopped.wait()
    if workers is not None:
        await workers.stop()
    admin.close()
    if status is not None:
        status.close()
    if client is not None:
        await client.close()
    return 0


def start_workers(sidecar: Sidecar, opts: SidecarOptions) -> Any:
    """With concurrency > 1: the worker processes (``diktyo.proxy.workers``), else None."""
    from diktyo.proxy.workers import resolve_concurrency

    n = resolve_concurrency(opts.concurrency)
    if n <= 1:
        return None
    from diktyo.proxy.workers import Workers

    level = logging.getLevelName(logging.getLogger().getEffectiveLevel()).lower()
    settings = {
        "header_timeout": opts.header_timeout, "accept_http_10": opts.accept_http_10,
        "access_log_buffer": opts.access_log_buffer, "seed": opts.seed, "log_level": level,
    }  # fmt: skip
    workers = Workers(sidecar, n, settings)
    sidecar.workers = workers  # the admin's /workers
    workers.start()
    log.info("sidecar runs %d workers (concurrency %s)", n, opts.concurrency)
    return workers


def read_kube_token(path: str) -> str:
    """The pod's projected service-account token (the kubelet writes and rotates the file)."""
    with open(path) as f:
        token = f.read().strip()
    if not token:
        raise OSError(f"{path} is empty")
    return token


async def _refresh_kube_token(client: Any, path: str, rotator: Any = None,
                              every: float = 60.0) -> None:
    """Go back to the projected token every minute: the kubelet rotates it, and the diktyo
    token the control plane hands out in answers dies with a control plane that restarts
    without a persistent store. The certificate rotator gets it too (renewals prove
    themselves with the current certificate; the token is needed once that has expired)."""
    while True:
        await asyncio.sleep(every)
        try:
            client.token = read_kube_token(path)
        except OSError as exc:
            log.warning("cannot re-read the service-account token %s: %s", path, exc)
            continue
        if rotator is not None:
            rotator.token = client.token


def kube_spiffe_id(opts: SidecarOptions) -> str | None:
    """The SPIFFE id a pod's sidecar asks its certificate for with its projected token:
    ``spiffe://<DIKTYO_TRUST_DOMAIN>/ns/<POD_NAMESPACE>/sa/<SERVICE_ACCOUNT>``; None (with a
    warning) when the token or the pod's namespace / service account is not known."""
    if not opts.kube_token_file:
        return None
    if not opts.pod_namespace or not opts.service_account:
        log.warning("no workload certificate (mTLS): POD_NAMESPACE and SERVICE_ACCOUNT must be "
                    "set (the injector sets both from the downward API) to ask the CA with the "
                    "service-account token %s", opts.kube_token_file)
        return None
    from diktyo.security.spiffe import spiffe_uri

    return spiffe_uri(opts.trust_domain or "cluster.local", opts.pod_namespace,
                      opts.service_account)


def _remove_token(path: str) -> None:
    """Remove a token file this sidecar generated in its state dir (and the dir if empty)."""
    try:
        os.unlink(path)
        os.rmdir(os.path.dirname(path))
    except OSError:
        pass


async def start_identity(sidecar: Sidecar, ca_url: str, token: str, timeout: float,
                         spiffe_id: str | None = None) -> str:
    """Get the workload certificate (CSR to the control plane's CA), keep renewing it.

    ``token`` is a bootstrap token (its subject is the SPIFFE id) or, with ``spiffe_id``, the
    pod's projected service-account token. Returns "" when the first certificate is installed
    in ``sidecar.certs``, else an error.
    """
    from diktyo.proxy.network.tls import CertificateStore
    from diktyo.security.identity import (
        CertificateRotator,
        Credentials,
        IdentityError,
        token_subject,
    )

    try:
        spiffe = spiffe_id or token_subject(token)
    except IdentityError as exc:
        return f"bootstrap token: {exc}"
    proof = ("the pod's service-account token (is the control plane running in the cluster, "
             "allowed to create tokenreviews, with the same trust domain?)" if spiffe_id else
             "the bootstrap token (--token-file), one it issued?")
    store = CertificateStore()
    store.inbound_stats = sidecar.stats.listener  # envoy_listener_ssl_handshake / _session_reused
    got = asyncio.Event()

    def on_update(c: Credentials) -> None:
        store.update(c.cert_chain_pem, c.key_pem, c.trust_bundle_pem)
        log.info("workload certificate for %s installed (expires %.0f)", c.spiffe_id, c.not_after)
        got.set()

    rotator = CertificateRotator(ca_url, spiffe, token, on_update)
    sidecar.certs = store
    sidecar.rotator = rotator
    sidecar._spawn(rotator.run())
    try:
        await asyncio.wait_for(got.wait(), timeout)
    except TimeoutError:
        return (
            f"no workload certificate for {spiffe} from the CA at {ca_url} within {timeout:g}s "
            f"({rotator.failures} failed attempts; see the warnings above): is the control plane "
            f"running and does it accept {proof}"
        )
    return ""


def run(opts: SidecarOptions) -> int:
    install_uvloop()
    try:
        return asyncio.run(serve(opts))
    except (SnapshotError, OSError) as exc:
        print(f"diktyo sidecar: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
