"""diktyo.testing: public fakes and helpers (fake upstreams, sidecar runners, snapshot builders,
free ports, ``eventually()`` polling instead of sleeps)."""

from diktyo.platform.ports import free_port
from diktyo.testing.client import ClientResponse, HttpClient, http_request
from diktyo.testing.fake_upstream import FakeUpstream, RecordedRequest, Response
from diktyo.testing.istio_yaml import reviews_by_user, static_service_entry
from diktyo.testing.mesh_yaml import hello_front_mesh
from diktyo.testing.sidecar import SidecarHandle, start_sidecar, start_sidecar_process
from diktyo.testing.snapshots import http_snapshot, outbound_cluster
from diktyo.testing.wait import eventually, eventually_sync

__all__ = [
    "ClientResponse",
    "FakeUpstream",
    "HttpClient",
    "RecordedRequest",
    "Response",
    "SidecarHandle",
    "eventually",
    "eventually_sync",
    "free_port",
    "hello_front_mesh",
    "http_request",
    "http_snapshot",
    "outbound_cluster",
    "reviews_by_user",
    "start_sidecar",
    "start_sidecar_process",
    "static_service_entry",
]
