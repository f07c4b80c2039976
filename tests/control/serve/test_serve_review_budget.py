"""An unauthenticated caller cannot make the control plane send one TokenReview per garbage
token: a refusal budget per source address (429 before any review once it is spent)."""

from __future__ import annotations

import aiohttp

from diktyo.control.auth import ReviewLimiter
from diktyo.control.server import ControlPlane
from diktyo.testing.kube_api import projected_token


def test_the_limiter_refills_and_forgets_the_fullest_sources() -> None:
    now = [0.0]
    lim = ReviewLimiter(burst=3, rate=0.5, sources=2, clock=lambda: now[0])
    for _ in range(3):
        assert lim.wait("a") == 0.0
        lim.refused("a")
    assert lim.wait("a") == 2.0  # one refusal back after 1 / 0.5 s
    now[0] = 2.0
    assert lim.wait("a") == 0.0
    lim.refused("b")
    lim.refused("c")  # three sources: the fullest ("b"/"c" at 2 of 3) is forgotten, not "a"
    assert "a" in lim._buckets and len(lim._buckets) == 2
    assert lim.limited == 1


async def test_garbage_tokens_from_one_source_cost_a_bounded_number_of_reviews() -> None:
    reviewed: list[str] = []

    async def reviewer(token: str) -> str | None:  # the API server refuses every token
        reviewed.append(token)
        return None

    cp = ControlPlane(observability=False)
    now = [0.0]
    cp.access.review_limit = ReviewLimiter(burst=5, rate=1.0, clock=lambda: now[0])
    cp.access.token_reviewer = reviewer
    await cp.start()
    try:
        statuses = []
        async with aiohttp.ClientSession() as s:
            for i in range(20):
                token = projected_token("system:serviceaccount:x:y", ("diktyo-ca",), str(i))
                headers = {"Authorization": f"Bearer {token}"}
                async with s.get(cp.url + "/v1/snapshot?node=n", headers=headers) as r:
                    statuses.append(r.status)
                    if r.status == 429:
                        assert r.headers["Retry-After"] == "1"
                        assert "TokenReview" in (await r.json())["error"]
            assert statuses == [401] * 5 + [429] * 15
            assert len(reviewed) == 5
            # certificates ask for reviews too: same budget
            body = {"csr": "-----BEGIN CERTIFICATE REQUEST-----", "token": "t"}
            async with s.post(cp.url + "/v1/certificates", json=body) as r:
                assert r.status == 429
            now[0] = 1.0  # one more refusal allowed a second later
            async with s.get(cp.url + "/v1/snapshot?node=n", headers=headers) as r:
                assert r.status == 401
            async with s.get(cp.url + "/v1/snapshot?node=n", headers=headers) as r:
                assert r.status == 429
            # the admin is not refused, so it spends nothing and is never limited
            admin = cp.admin_headers()
            async with s.get(cp.url + "/v1/snapshot?node=n", headers=admin) as r:
                assert r.status == 404  # unknown node: past the credential check
        assert len(reviewed) == 6
    finally:
        await cp.stop()


async def test_without_a_token_reviewer_nothing_is_limited() -> None:
    """Outside Kubernetes a refusal costs an HMAC check only: plain 401s, however many."""
    cp = ControlPlane(observability=False)
    cp.access.review_limit = ReviewLimiter(burst=1, rate=0.001)
    await cp.start()
    try:
        async with aiohttp.ClientSession() as s:
            for _ in range(5):
                async with s.get(
                    cp.url + "/v1/snapshot?node=n", headers={"Authorization": "Bearer nope"}
                ) as r:
                    assert r.status == 401
    finally:
        await cp.stop()
