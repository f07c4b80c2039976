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
import gc
import json
import logging
import os
import signal
import sys
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import msgspec

from diktyo.proxy.admin import TOKEN_FILE_ENV as ADMIN_TOKEN_FILE_ENV
from diktyo.proxy.admin import AdminServer, AdminTokenError, resolve_token
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

    # bearer token file for state-changing admin endpoints ("" = generate one in the state dir)
    admin_token_file: str = field(default_factory=lambda: os.environ.get(ADMIN_TOKEN_FILE_ENV, ""))


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


def load_snapshot(opts: SidecarOptions) -> Snapshot:
    if opts.snapshot:
        data = Path(opts.snapshot).read_bytes()
        return override_outbound_port(decode(data), opts.outbound_port)
    if opts.config:
        if opts.config_loader is None:
            raise SnapshotError(
                "--config DIR needs the control plane's translator: start the sidecar with "
                "`diktyo sidecar` or `python -m diktyo.proxy`"
            )
        return opts.config_loader(opts.config, opts.outbound_port or 0)
    raise SnapshotError(
        "no snapshot source: pass --snapshot FILE, --config DIR or --control-plane URL --node ID"
    )


async def serve(opts: SidecarOptions, ready_out=sys.stdout) -> int:  # type: ignore[no-untyped-def]
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
    opts: SidecarOptions, ready_out, sidecar: Sidecar, token: str, token_path: Path | None
) -> int:
    loop = asyncio.get_running_loop()
    client = None
    # the admin port answers first (/ready is 503 until a snapshot is applied)
    admin = AdminServer(sidecar, token, str(token_path) if token_path else "")
    await admin.start(opts.admin_address, opts.admin_port)
    if opts.control_plane and opts.ca_token:
        error = await start_identity(
            sidecar, opts.control_plane, opts.ca_token, opts.identity_timeout
        )
        if error:
            print(f"diktyo sidecar: {error}", file=sys.stderr)
            admin.close()
            await sidecar.stop()
            return 1
    if opts.control_plane:
        from diktyo.proxy.config_client import ConfigClient

        ready_evt = asyncio.Event()

        def on_snapshot(snap: Snapshot) -> None:
            sidecar.apply(override_outbound_port(snap, opts.outbound_port))
            ready_evt.set()

        assert opts.node is not None  # checked above: --control-plane needs --node
        client = ConfigClient(opts.control_plane, opts.node, on_snapshot, token=opts.ca_token)
        client.start()
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
    gc.collect()
    gc.freeze()  # config objects leave the collector's view
    # per-request objects die by reference counting; collect cycles less often on the hot path
    gc.set_threshold(20000, 20, 20)
    version = sidecar.rt.snapshot.version if sidecar.rt is not None else ""
    line = json.dumps(
        {
            "event": "ready",
            "admin": admin.port,
            "listeners": sidecar.ports(),
            "version": version,
            "admin_token_file": str(token_path) if token_path else None,
        },
        separators=(",", ":"),
    )
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
    admin.close()
    if client is not None:
        await client.close()
    return 0


def _remove_token(path: Path) -> None:
    """Remove a token file this sidecar generated in its state dir (and the dir if empty)."""
    try:
        path.unlink()
        path.parent.rmdir()
    except OSError:
        pass


async def start_identity(sidecar: Sidecar, ca_url: str, token: str, timeout: float) -> str:
    """Get the workload certificate (CSR to the control plane's CA), keep renewing it.

    Returns "" when the first certificate is installed in ``sidecar.certs``, else an error.
    """
    from diktyo.proxy.network.tls import CertificateStore
    from diktyo.security.identity import (
        CertificateRotator,
        Credentials,
        IdentityError,
        token_subject,
    )

    try:
        spiffe = token_subject(token)
    except IdentityError as exc:
        return f"bootstrap token: {exc}"
    store = CertificateStore()
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
            "running and is the bootstrap token (--token-file) one it issued?"
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
