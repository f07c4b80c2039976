"""Proxy status states: NOT CONNECTED, STALE, SYNCED, NACK."""

from diktyo.control.serve.health import HealthTracker
from diktyo.control.serve.status import ProxyStatus


def test_states() -> None:
    st = ProxyStatus("a")
    assert st.state == "NOT CONNECTED"
    st.current = st.sent = "1-x"
    assert st.state == "STALE"
    st.ack("1-x", True, "", 0.0)
    assert st.state == "SYNCED"
    st.current = st.sent = "2-y"
    assert st.state == "STALE"
    st.ack("2-y", False, "bad route", 0.0)
    assert st.state == "NACK" and st.error == "bad route" and st.acked == "1-x"
    st.current = st.sent = "3-z"
    st.ack("3-z", True, "", 0.0)
    assert st.state == "SYNCED"


def test_health_thresholds() -> None:
    h = HealthTracker(unhealthy_threshold=2)
    assert h.observe("a", False, True) is None
    assert h.observe("a", False, True) is False
    assert h.observe("a", True, False) is True
    assert h.observe("a", True, True) is None
