"""Transparent capture: the 15001 / 15006 listeners, original destination, protocol sniffing.

``ensure_capture(snapshot, mode)`` is the sidecar's side of ``DIKTYO_INTERCEPTION_MODE`` /
``--interception-mode`` (Istio's ``ISTIO_META_INTERCEPTION_MODE``): with REDIRECT, iptables
sends the app's traffic to 15001 / 15006 whatever the control plane thinks, so a snapshot
without capture listeners (the node was not registered with ``interception_mode:
REDIRECT``) gets them added in passthrough form: the app keeps working (every connection is
forwarded to where it was going, inbound ones to 127.0.0.1:<port>), without mesh features,
and a warning says why.
"""

from __future__ import annotations

import logging

import msgspec

from diktyo.snapshot.model import Capture, Listener, Snapshot

log = logging.getLogger("diktyo.proxy")

MODES = ("NONE", "REDIRECT")


def ensure_capture(snapshot: Snapshot, mode: str) -> Snapshot:
    """``snapshot`` with capture listeners when ``mode`` is REDIRECT (see module docstring)."""
    if mode != "REDIRECT":
        return snapshot
    if any(lst.direction.startswith("capture_") for lst in snapshot.listeners):
        return snapshot
    log.warning(
        "interception mode REDIRECT, but snapshot %s has no capture listeners (node %s is not "
        "registered with interception_mode REDIRECT): opening 15001/15006 in passthrough only; "
        "register the node with interception_mode REDIRECT for routing, mTLS and policies",
        snapshot.version,
        snapshot.node.id,
    )
    cap = snapshot.capture or Capture(
        outbound_traffic_policy=snapshot.mesh.outbound_traffic_policy,
        protocol_detection_timeout=snapshot.mesh.protocol_detection_timeout,
    )
    extra = (
        Listener(name="virtualOutbound", direction="capture_outbound", address="0.0.0.0",
                 port=cap.outbound_port),
        Listener(name="virtualInbound", direction="capture_inbound", address="0.0.0.0",
                 port=cap.inbound_port),
    )  # fmt: skip
    return msgspec.structs.replace(snapshot, listeners=snapshot.listeners + extra, capture=cap)
