"""Header operations of the route and of the chosen destination (Istio ``headers``), and the
load balancer's consistent-hash cookie, as a filter.

Requests: runs in the chain's *route* stage (the destination is chosen and the forwarded
headers are prepared), once per request. Responses: on the upstream's response head; the
header block is parsed into pairs only when an operation or a cookie applies.
"""

from __future__ import annotations

from diktyo.proxy.codec.events import RequestHead, ResponseHead
from diktyo.proxy.filters.contract import CONTINUE, FilterCallbacks, FilterStatus, HttpFilter


class RequestHeaderOpsFilter(HttpFilter):
    """Route and destination request header operations (in the chain only when a route has
    some)."""

    __slots__ = ()

    def decode_headers(self, cb: FilterCallbacks, head: RequestHead) -> FilterStatus:
        cr = cb.route_entry()
        if cr is not None:
            h = head.headers
            if cr.req_ops:
                cr.req_ops.apply_request(h)
            d = cb.dest
            if d is not None and d.req_ops:
                d.req_ops.apply_request(h)
        return CONTINUE


class ResponseHeaderOpsFilter(HttpFilter):
    """Route and destination response header operations and the consistent-hash cookie (in
    the chain only when a route has some or a cluster hashes on a cookie)."""

    __slots__ = ()

    def encode_headers(self, cb: FilterCallbacks, head: ResponseHead) -> FilterStatus:
        cr = cb.route
        if cr is None:
            return CONTINUE
        d = cb.dest
        cookie = cb.lb_cookie()
        if cr.resp_ops or (d is not None and d.resp_ops) or cookie is not None:
            out = head.pairs()
            if cr.resp_ops:
                out = cr.resp_ops.apply_response(out)
            if d is not None and d.resp_ops:
                out = d.resp_ops.apply_response(out)
            if cookie is not None:
                name, value, ttl = cookie
                c = (
                    f"{name}={value}; Max-Age={int(ttl)}; Path=/; HttpOnly"
                    if ttl
                    else f"{name}={value}; Path=/; HttpOnly"
                )
                out.append((b"set-cookie", c.encode("latin-1")))
            head.set_pairs(out)
        return CONTINUE
