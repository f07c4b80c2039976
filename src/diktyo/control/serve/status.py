"""Per-proxy sync status: which version was sent, which was ACKed or NACKed (``proxy-status``).

States follow ``istioctl proxy-status``:

- ``SYNCED``: the proxy ACKed the newest version the control plane has for it.
- ``NACK``: the proxy rejected the newest version (``error`` says why); it keeps serving its
  last good one (``acked``).
- ``STALE``: a newer version exists than the one ACKed (sent and not yet answered, or the proxy
  is not connected to receive it).
- ``NOT CONNECTED``: the proxy never fetched a snapshot.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(slots=True)
class ProxyStatus:
    node: str
    current: str = ""  # newest version the control plane built for this node
    sent: str = ""  # last version handed to the proxy
    acked: str = ""  # last version the proxy accepted
    nacked: str = ""  # last version the proxy rejected
    error: str = ""  # reason of the last NACK
    last_seen: float = 0.0  # wall time of the last poll or ack
    connected: bool = False  # a long poll is open right now
    polls: int = 0

    @property
    def state(self) -> str:
        if not self.sent and not self.acked:
            return "NOT CONNECTED"
        if self.current and self.nacked == self.current:
            return "NACK"
        if self.current and self.acked == self.current:
            return "SYNCED"
        return "STALE"

    def ack(self, version: str, ok: bool, error: str, now: float) -> None:
        self.last_seen = now
        if ok:
            self.acked = version
            if self.nacked == version:
                self.nacked = ""
                self.error = ""
        else:
            self.nacked = version
            self.error = error or "rejected without a reason"

    def to_json(self) -> dict[str, object]:
        return {
            "node": self.node,
            "state": self.state,
            "version": self.current,
            "sent": self.sent,
            "acked": self.acked,
            "nacked": self.nacked,
            "error": self.error,
            "connected": self.connected,
            "last_seen": self.last_seen,
        }
