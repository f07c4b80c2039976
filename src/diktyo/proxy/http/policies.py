"""The upstream policies the connection manager calls, in one import place.

Host state, load balancing, circuit breaking and outlier detection live in
``diktyo.proxy.upstream``, retry state in ``diktyo.proxy.router.retry`` and fault decisions in
``diktyo.proxy.filters.fault`` (behaviour: docs/upstream.md).
"""

from __future__ import annotations

from diktyo.proxy.filters.fault import decide_fault
from diktyo.proxy.router.retry import RetryBudget, RetryState
from diktyo.proxy.upstream.cluster import ClusterState
from diktyo.proxy.upstream.lb import LbContext

__all__ = ["ClusterState", "LbContext", "RetryBudget", "RetryState", "decide_fault"]
