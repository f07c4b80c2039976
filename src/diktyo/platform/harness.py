"""Start a whole local mesh from a test (or any sync code): ``MeshThread``.

    from diktyo.platform.harness import MeshThread
    with MeshThread("samples/bookinfo/mesh.yaml", gateway_host_port=0) as mesh:
        mesh.apply_file("samples/bookinfo/networking/virtual-service-all-v1.yaml")
        mesh.wait_synced()
        urllib.request.urlopen(mesh.gateway_url + "/productpage")

The mesh (control plane in-process, real sidecars and apps as child processes) runs on an event
loop in a background thread; leaving the ``with`` block stops apps, sidecars and the control
plane in order. Async tests can use ``diktyo.platform.supervisor.LocalMesh`` directly.
"""

from __future__ import annotations

import asyncio
import io
import sys
import threading
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Self, TextIO

from diktyo.platform.mesh import GatewayPortSpec, MeshSpec, load_mesh
from diktyo.platform.supervisor import LocalMesh


def with_gateway_host_port(spec: MeshSpec, host_port: int) -> MeshSpec:
    """A copy of ``spec`` whose gateways listen on ``host_port`` (0 = free ports, for tests)."""
    gateways = [
        g.model_copy(
            update={"ports": [GatewayPortSpec(port=p.port, host_port=host_port) for p in g.ports]}
        )
        for g in spec.gateways
    ]
    return spec.model_copy(update={"gateways": gateways})


class MeshThread:
    def __init__(
        self,
        mesh: str | Path | MeshSpec,
        *,
        config_dir: str | Path | None = None,
        gateway_host_port: int | None = None,
        out: TextIO | None = None,
        start_timeout: float = 60.0,
        **mesh_kwargs: Any,
    ) -> None:
        spec = mesh if isinstance(mesh, MeshSpec) else load_mesh(mesh)
        if gateway_host_port is not None:
            spec = with_gateway_host_port(spec, gateway_host_port)
        self.spec = spec
        self.out = out if out is not None else io.StringIO()
        self.start_timeout = start_timeout
        self._kwargs = {"config_dir": config_dir, **mesh_kwargs}
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="mesh", daemon=True)
        self.mesh: LocalMesh | None = None

    # ------------------------------------------------------------------ running code on the loop

    def call(self, coro: Any, timeout: float = 30.0) -> Any:
        fut: Future[Any] = asyncio.run_coroutine_threadsafe(coro, self.loop)
        return fut.result(timeout)

    def run(self, fn: Any, *args: Any) -> Any:
        """Run a plain function on the mesh's loop (the control plane is not thread-safe)."""

        async def _call() -> Any:
            return fn(*args)

        return self.call(_call())

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> Self:
        self._thread.start()

        async def _start() -> None:
            self.mesh = LocalMesh(self.spec, out=self.out, **self._kwargs)
            await self.mesh.start()

        try:
            self.call(_start(), self.start_timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        if self.mesh is not None:
            try:
                self.call(self.mesh.stop(), 60)
            finally:
                self.mesh = None
        if self._thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(10)
        if not self.loop.is_closed() and not self.loop.is_running():
            self.loop.close()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------ helpers

    @property
    def url(self) -> str:
        assert self.mesh is not None
        return self.mesh.url

    @property
    def gateway_url(self) -> str:
        assert self.mesh is not None
        return self.mesh.gateway_url()

    def apply_text(self, text: str, source: str = "<test>") -> list[Any]:
        """Apply Istio YAML; raises ValueError with the FILE:LINE:COL errors if rejected."""
        assert self.mesh is not None
        keys, errors = self.run(self.mesh.cp.store.apply_text, text, source)
        if errors:
            raise ValueError("\n".join(errors))
        return list(keys)

    def apply_file(self, path: str | Path) -> list[Any]:
        return self.apply_text(Path(path).read_text(), str(path))

    def delete_text(self, text: str) -> list[Any]:
        assert self.mesh is not None
        keys, _ = self.run(self.mesh.cp.store.delete_text, text, "<test>")
        return list(keys)

    def wait_synced(self, timeout: float = 15.0) -> None:
        """Push now and wait until every sidecar ACKed its newest snapshot."""
        assert self.mesh is not None
        if not self.call(self.mesh.cp.sync(timeout), timeout + 5):
            raise TimeoutError(f"sidecars not synced within {timeout:g}s")

    def describe(self) -> dict[str, Any]:
        assert self.mesh is not None
        return self.run(self.mesh.describe)  # type: ignore[no-any-return]

    def pids(self) -> list[int]:
        assert self.mesh is not None
        return self.run(self.mesh.pids)  # type: ignore[no-any-return]

    def output(self) -> str:
        return self.out.getvalue() if isinstance(self.out, io.StringIO) else ""


def _print(text: str) -> None:  # pragma: no cover - debugging aid
    sys.stdout.write(text)
