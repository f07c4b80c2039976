"""The dashboard: a static UI and its JSON API, mounted on the control plane's API application.

The control plane never imports this package; whoever composes the program (``diktyo
control-plane``, ``diktyo up``, a test) calls ``mount(cp)`` before ``cp.start()``::

    cp = ControlPlane(...)
    mount(cp)        # the UI at /, its API at /api/...
    await cp.start()

``mount`` reads only what ``ControlPlaneLike`` names: the API application and the control
plane's observability part (metric and trace stores, config, resilience; ``None`` when the
control plane runs without observability, and then nothing is mounted).
"""

from __future__ import annotations

from typing import Any, Protocol

from aiohttp import web


class ObservabilityLike(Protocol):
    """What the dashboard reads (``diktyo.control.serve.observability.Observability``)."""

    @property
    def metric_source(self) -> Any: ...
    @property
    def traces(self) -> Any: ...
    def config(self) -> dict[str, Any]: ...
    async def resilience(self) -> list[dict[str, Any]]: ...
    def mtls_edge(self, source_id: str, target_id: str) -> bool: ...


class ControlPlaneLike(Protocol):
    @property
    def app(self) -> web.Application: ...
    @property
    def observability(self) -> ObservabilityLike | None: ...


def mount(cp: ControlPlaneLike, prefix: str = "") -> bool:
    """Mount the dashboard on ``cp.app`` (before it starts); False when ``cp`` has no
    observability (``ControlPlane(observability=False)``): nothing to show."""
    from diktyo.dashboard.backend import MeshBackend
    from diktyo.dashboard.server import setup_dashboard

    obs = cp.observability
    if obs is None:
        return False
    backend = MeshBackend(
        obs.metric_source, obs.traces, config=obs.config, resilience=obs.resilience,
        mtls=obs.mtls_edge,
    )  # fmt: skip
    setup_dashboard(cp.app, backend, prefix)
    return True


__all__ = ["ControlPlaneLike", "ObservabilityLike", "mount"]
