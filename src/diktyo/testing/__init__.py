"""diktyo.testing: public fakes and helpers (fake upstreams, sidecar runners, snapshot builders,
free ports, ``eventually()`` polling instead of sleeps)."""

from diktyo.platform.ports import free_port
from diktyo.testing.client import ClientResponse, HttpClient, http_request
from diktyo.testing.fake_upstream import FakeUpstream, RecordedRequest, Response
from diktyo.testing.sidecar import SidecarHandle, start_sidecar, start_sidecar_process
from diktyo.testing.snapshots import cluster_name, http_snapshot
from diktyo.testing.wait import eventually, eventually_sync

__all__ = [
    "ClientResponse",
    "FakeUpstream",
    "HttpClient",
    "RecordedRequest",
    "Response",
    "SidecarHandle",
    "cluster_name",
    "eventually",
    "eventually_sync",
    "free_port",
    "http_request",
    "http_snapshot",
    "start_sidecar",
    "start_sidecar_process",
]
