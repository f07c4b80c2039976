"""Bookinfo's apps as real processes on 127.0.0.1, wired by DETAILS_URL / REVIEWS_URL / RATINGS_URL."""

from __future__ import annotations

import json
from dataclasses import dataclass

import aiohttp
import pytest
from sample_helpers import Recorder, Reply, StartApp, closed_port_url

from diktyo.samples.bookinfo.productpage import (
    DETAILS_UNAVAILABLE,
    PRODUCTS,
    REVIEWS_UNAVAILABLE,
    clean_user,
    render_page,
)
from diktyo.samples.bookinfo.reviews import RATINGS_UNAVAILABLE

pytestmark = pytest.mark.timeout(60)

TRACE = {
    "x-request-id": "4b1d2c4e-0000-4000-8000-000000000001",
    "traceparent": "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01",
    "tracestate": "vendor=1",
    "x-b3-traceid": "4bf92f3577b34da6a3ce929d0e0e4736",
    "x-b3-spanid": "00f067aa0ba902b7",
    "x-b3-sampled": "1",
}
REVIEWS_JSON = {
    "id": "0",
    "podname": "reviews-fake-1",
    "reviews": [{"reviewer": "Reviewer1", "text": "Fake review"}],
}


@dataclass
class Bookinfo:
    details: str
    ratings: str
    reviews: dict[str, str]  # version -> url
    productpage: dict[str, str]  # reviews version -> productpage url


@pytest.fixture(scope="module")
def bookinfo(start_module_app: StartApp) -> Bookinfo:
    details = start_module_app("bookinfo.details").url
    ratings = start_module_app("bookinfo.ratings").url
    reviews = {
        v: start_module_app(
            "bookinfo.reviews", SERVICE_VERSION=v, POD_NAME=f"reviews-{v}-1", RATINGS_URL=ratings
        ).url
        for v in ("v1", "v2", "v3")
    }
    pages = {
        v: start_module_app("bookinfo.productpage", DETAILS_URL=details, REVIEWS_URL=reviews[v]).url
        for v in ("v1", "v3")
    }
    return Bookinfo(details, ratings, reviews, pages)


async def get(url: str, **kwargs: object) -> tuple[int, str]:
    async with aiohttp.ClientSession() as session, session.get(url, **kwargs) as resp:  # type: ignore[arg-type]
        return resp.status, await resp.text()


# --------------------------------------------------------------------------- the whole app


async def test_productpage_shows_details_and_reviews_v1(bookinfo: Bookinfo) -> None:
    status, html = await get(bookinfo.productpage["v1"] + "/productpage")
    assert status == 200
    assert "The Comedy of Errors" in html
    assert "PublisherA" in html and "1234567890" in html  # from details
    assert "An extremely entertaining play by Shakespeare" in html  # from reviews
    assert "Reviews served by: reviews-v1-1" in html
    assert "★" not in html and "<font color" not in html  # v1: no ratings
    assert DETAILS_UNAVAILABLE not in html and REVIEWS_UNAVAILABLE not in html


async def test_productpage_with_reviews_v3_shows_red_stars(bookinfo: Bookinfo) -> None:
    status, html = await get(bookinfo.productpage["v3"] + "/productpage")
    assert status == 200
    assert '<font color="red">★★★★★</font>' in html  # Reviewer1: 5
    assert '<font color="red">★★★★☆</font>' in html  # Reviewer2: 4
    assert "Reviews served by: reviews-v3-1" in html


@pytest.mark.parametrize(("version", "color"), [("v2", "black"), ("v3", "red")])
async def test_reviews_with_ratings_have_coloured_stars(
    bookinfo: Bookinfo, version: str, color: str
) -> None:
    status, text = await get(bookinfo.reviews[version] + "/reviews/0")
    body = json.loads(text)
    assert status == 200
    assert body["podname"] == f"reviews-{version}-1"
    assert [r["rating"] for r in body["reviews"]] == [
        {"stars": 5, "color": color},
        {"stars": 4, "color": color},
    ]


async def test_reviews_v1_has_no_ratings(bookinfo: Bookinfo) -> None:
    status, text = await get(bookinfo.reviews["v1"] + "/reviews/7")
    body = json.loads(text)
    assert status == 200 and body["id"] == "7" and len(body["reviews"]) == 2
    assert all("rating" not in r for r in body["reviews"])


async def test_details_ratings_and_api(bookinfo: Bookinfo) -> None:
    status, text = await get(bookinfo.details + "/details/3")
    assert status == 200
    assert json.loads(text)["ISBN-13"] == "123-1234567890" and json.loads(text)["id"] == 3
    assert (await get(bookinfo.details + "/details/x"))[0] == 400
    status, text = await get(bookinfo.ratings + "/ratings/0")
    assert status == 200
    assert json.loads(text) == {"id": 0, "ratings": {"Reviewer1": 5, "Reviewer2": 4}}
    page = bookinfo.productpage["v3"]
    status, text = await get(page + "/api/v1/products")
    assert status == 200 and json.loads(text)[0]["title"] == "The Comedy of Errors"
    status, text = await get(page + "/api/v1/products/0/reviews")
    assert status == 200 and json.loads(text)["podname"] == "reviews-v3-1"
    status, text = await get(page + "/api/v1/products/0")
    assert status == 200 and json.loads(text)["publisher"] == "PublisherA"
    for url in (page, bookinfo.details, bookinfo.ratings, bookinfo.reviews["v2"]):
        status, text = await get(url + "/health")
        assert status == 200 and "healthy" in text


# --------------------------------------------------------------------------- users and headers


async def test_login_forwards_end_user_to_reviews(start_app: StartApp, recorder: Recorder) -> None:
    recorder.reply("/reviews/", Reply(json=REVIEWS_JSON))
    recorder.reply("/details/", Reply(json={"type": "paperback"}))
    page = start_app("bookinfo.productpage", DETAILS_URL=recorder.url, REVIEWS_URL=recorder.url).url
    # unsafe=True: aiohttp's cookie jar ignores cookies from IP addresses otherwise
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as session:
        async with session.get(page + "/productpage") as resp:
            html = await resp.text()
        assert 'name="username"' in html  # the login form
        assert "end-user" not in recorder.to("/reviews/")[-1].headers
        async with session.post(page + "/login", data={"username": "jason", "passwd": "x"}) as resp:
            assert resp.status == 200  # followed the redirect to /productpage
            assert str(resp.url).endswith("/productpage")
            html = await resp.text()
        assert "Signed in as <b>jason</b>" in html
        assert recorder.to("/reviews/")[-1].headers["end-user"] == "jason"
        assert recorder.to("/details/")[-1].headers["end-user"] == "jason"
        assert "Reviews served by: reviews-fake-1" in html
        async with session.get(page + "/logout") as resp:
            assert resp.status == 200
        n = len(recorder.to("/reviews/"))
        async with session.get(page + "/productpage") as resp:
            assert "Signed in" not in await resp.text()
        assert len(recorder.to("/reviews/")) == n + 1
        assert "end-user" not in recorder.to("/reviews/")[-1].headers


async def test_productpage_forwards_trace_headers(start_app: StartApp, recorder: Recorder) -> None:
    recorder.reply("/reviews/", Reply(json=REVIEWS_JSON))
    recorder.reply("/details/", Reply(json={"type": "paperback"}))
    page = start_app("bookinfo.productpage", DETAILS_URL=recorder.url, REVIEWS_URL=recorder.url).url
    status, _ = await get(page + "/productpage", headers={**TRACE, "x-unrelated": "no"})
    assert status == 200
    for prefix in ("/details/", "/reviews/"):
        (seen,) = recorder.to(prefix)
        for name, value in TRACE.items():
            assert seen.headers.get(name) == value, (prefix, name)
        assert "x-unrelated" not in seen.headers


async def test_reviews_forwards_end_user_and_trace_to_ratings(
    start_app: StartApp, recorder: Recorder
) -> None:
    recorder.reply("/ratings/", Reply(json={"id": 0, "ratings": {"Reviewer1": 2, "Reviewer2": 1}}))
    reviews = start_app("bookinfo.reviews", SERVICE_VERSION="v2", RATINGS_URL=recorder.url).url
    status, text = await get(reviews + "/reviews/0", headers={**TRACE, "end-user": "jason"})
    assert status == 200
    assert [r["rating"]["stars"] for r in json.loads(text)["reviews"]] == [2, 1]
    (seen,) = recorder.to("/ratings/0")
    assert seen.headers["end-user"] == "jason"
    assert all(seen.headers.get(k) == v for k, v in TRACE.items())


async def test_calls_go_through_http_proxy(start_app: StartApp, recorder: Recorder) -> None:
    """With HTTP_PROXY set (the sidecar), productpage asks it for http://details:9080/..."""
    recorder.reply("/reviews/", Reply(json=REVIEWS_JSON))
    recorder.reply("/details/", Reply(json={"type": "hardcover"}))
    page = start_app("bookinfo.productpage", HTTP_PROXY=recorder.url).url
    status, html = await get(page + "/productpage")
    assert status == 200 and "hardcover" in html
    assert [(r.host, r.path) for r in recorder.requests] == [
        ("details:9080", "/details/0"),
        ("reviews:9080", "/reviews/0"),
    ]
    assert recorder.requests[0].url == "http://details:9080/details/0"


# --------------------------------------------------------------------------- failures


async def test_ratings_down_shows_ratings_unavailable(start_app: StartApp) -> None:
    reviews = start_app("bookinfo.reviews", SERVICE_VERSION="v2", RATINGS_URL=closed_port_url()).url
    status, text = await get(reviews + "/reviews/0")
    assert status == 200
    assert [r["rating"] for r in json.loads(text)["reviews"]] == [
        {"error": RATINGS_UNAVAILABLE}
    ] * 2
    details = start_app("bookinfo.details").url
    page = start_app("bookinfo.productpage", DETAILS_URL=details, REVIEWS_URL=reviews).url
    status, html = await get(page + "/productpage")
    assert status == 200
    assert "Ratings service is currently unavailable" in html
    assert "★" not in html


async def test_reviews_and_details_down_show_sorry(start_app: StartApp) -> None:
    page = start_app(
        "bookinfo.productpage", DETAILS_URL=closed_port_url(), REVIEWS_URL=closed_port_url()
    ).url
    status, html = await get(page + "/productpage")
    assert status == 200
    assert "Sorry, product reviews are currently unavailable for this book." in html
    assert "Sorry, product details are currently unavailable for this book." in html
    assert "Error fetching product reviews!" in html and "Error fetching product details!" in html
    status, text = await get(page + "/api/v1/products/0/reviews")
    assert status == 500 and json.loads(text) == {"error": REVIEWS_UNAVAILABLE}


async def test_productpage_retries_reviews_once(start_app: StartApp, recorder: Recorder) -> None:
    recorder.reply("/reviews/", Reply(503, {"error": "x"}), Reply(json=REVIEWS_JSON))
    recorder.reply("/details/", Reply(json={"type": "paperback"}))
    page = start_app("bookinfo.productpage", DETAILS_URL=recorder.url, REVIEWS_URL=recorder.url).url
    status, html = await get(page + "/productpage")
    assert status == 200
    assert "Reviews served by: reviews-fake-1" in html  # second attempt succeeded
    assert len(recorder.to("/reviews/")) == 2
    recorder.reply("/reviews/", Reply(503, {"error": "x"}))
    _, html = await get(page + "/productpage")
    assert REVIEWS_UNAVAILABLE in html
    assert len(recorder.to("/reviews/")) == 4  # two more attempts, then gave up


async def test_reviews_v3_gives_up_on_slow_ratings(start_app: StartApp, recorder: Recorder) -> None:
    """v3 waits 2.5 s for ratings (v2 would wait 10 s), as in Istio's fault injection task."""
    recorder.reply("/ratings/", Reply(json={"ratings": {"Reviewer1": 5, "Reviewer2": 4}}, delay=4))
    reviews = start_app("bookinfo.reviews", SERVICE_VERSION="v3", RATINGS_URL=recorder.url).url
    status, text = await get(reviews + "/reviews/0")
    assert status == 200
    assert json.loads(text)["reviews"][0]["rating"] == {"error": RATINGS_UNAVAILABLE}


async def test_misbehaving_ratings_versions(start_app: StartApp) -> None:
    ratings = start_app("bookinfo.ratings", SERVICE_VERSION="v-unavailable").url
    assert (await get(ratings + "/ratings/0"))[0] == 503
    faulty = start_app("bookinfo.ratings", SERVICE_VERSION="v-faulty").url
    codes = [(await get(faulty + "/ratings/0"))[0] for _ in range(40)]
    assert set(codes) == {200, 503}


async def test_bad_env_is_reported(start_app: StartApp) -> None:
    from diktyo.samples.launch import SampleError

    with pytest.raises(SampleError, match="REVIEWS_URL must be a URL"):
        start_app("bookinfo.productpage", REVIEWS_URL="reviews:9080")
    with pytest.raises(SampleError, match="PORT must be a port number"):
        start_app("bookinfo.details", PORT="http")


# --------------------------------------------------------------------------- pure parts


def test_render_page_stars_and_errors() -> None:
    reviews = {
        "podname": "reviews-v2-7",
        "reviews": [
            {"reviewer": "A", "text": "t<1>", "rating": {"stars": 3, "color": "black"}},
            {"reviewer": "B", "text": "t2", "rating": {"error": RATINGS_UNAVAILABLE}},
        ],
    }
    html = render_page(PRODUCTS[0], {"error": DETAILS_UNAVAILABLE}, reviews, "jason")
    assert '<font color="black">★★★☆☆</font>' in html
    assert RATINGS_UNAVAILABLE in html
    assert DETAILS_UNAVAILABLE in html
    assert "t&lt;1&gt;" in html  # escaped
    assert "Reviews served by: reviews-v2-7" in html
    assert "Signed in as <b>jason</b>" in html


def test_clean_user() -> None:
    assert clean_user("  jason ") == "jason"
    assert clean_user("ja\r\nson;x") == "jasonx"
    assert len(clean_user("x" * 500)) == 64
