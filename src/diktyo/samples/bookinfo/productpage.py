"""Bookinfo's productpage (v1): the web page that calls details and reviews.

Routes, as in Istio's productpage: ``GET /`` (index), ``GET /productpage`` (the page),
``POST /login`` (form field ``username``; kept in the cookie ``session=<user>``),
``GET /logout``, ``GET /health``, ``GET /api/v1/products``, ``/api/v1/products/<id>``,
``/api/v1/products/<id>/reviews`` and ``/api/v1/products/<id>/ratings``.

Like Istio's productpage it calls details with a 3 s timeout and reviews with a 3 s timeout and
one retry, forwards trace headers (and the user agent and credentials) from the incoming
request, and adds ``end-user: <user>`` when someone is signed in.

Env besides :mod:`diktyo.samples.runtime`'s: ``DETAILS_URL``, ``REVIEWS_URL``, ``RATINGS_URL``
(defaults ``http://details:9080``, ``http://reviews:9080``, ``http://ratings:9080``).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from html import escape
from typing import Any

import aiohttp
from aiohttp import web

from diktyo.samples.runtime import (
    CLIENT_KEY,
    CONTEXT_HEADERS,
    TRACE_HEADERS,
    Settings,
    env_url,
    new_app,
    propagated,
    run,
)

DETAILS_UNAVAILABLE = "Sorry, product details are currently unavailable for this book."
REVIEWS_UNAVAILABLE = "Sorry, product reviews are currently unavailable for this book."
RATINGS_UNAVAILABLE = "Sorry, product ratings are currently unavailable for this book."
CALL_TIMEOUT = 3.0
REVIEWS_ATTEMPTS = 2  # Istio's productpage tries reviews twice
FORWARDED = TRACE_HEADERS + CONTEXT_HEADERS
SESSION_COOKIE = "session"
MAX_USER_LENGTH = 64

PRODUCTS: tuple[dict[str, Any], ...] = (
    {
        "id": 0,
        "title": "The Comedy of Errors",
        "descriptionHtml": (
            '<a href="https://en.wikipedia.org/wiki/The_Comedy_of_Errors">Wikipedia Summary</a>:'
            " The Comedy of Errors is one of <b>William Shakespeare's</b> early plays. It is his"
            " shortest and one of his most farcical comedies, with a major part of the humour"
            " coming from slapstick and mistaken identity, in addition to puns and word play."
        ),
    },
)


@dataclass(frozen=True, slots=True)
class Upstreams:
    details: str
    reviews: str
    ratings: str

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Upstreams:
        return cls(
            env_url(env, "DETAILS_URL", "http://details:9080"),
            env_url(env, "REVIEWS_URL", "http://reviews:9080"),
            env_url(env, "RATINGS_URL", "http://ratings:9080"),
        )


def clean_user(raw: str) -> str:
    """A user name fit for a cookie and a header: printable, no spaces around, at most 64 chars."""
    user = "".join(ch for ch in raw if ch.isprintable() and ch not in ';,"\\').strip()
    return user[:MAX_USER_LENGTH]


def outgoing_headers(incoming: Mapping[str, str], user: str) -> dict[str, str]:
    """Headers for calls to details/reviews/ratings: forwarded ones plus ``end-user``."""
    headers = propagated(incoming, FORWARDED)
    if user:
        headers["end-user"] = user
    return headers


# --------------------------------------------------------------------------- rendering


def _stars(rating: Mapping[str, Any]) -> str:
    stars = rating.get("stars")
    if not isinstance(stars, int):
        return ""
    color = escape(str(rating.get("color", "black")), quote=True)
    full = max(0, min(stars, 5))
    return f'<font color="{color}">{"★" * full}{"☆" * (5 - full)}</font>'


def render_reviews(reviews: Mapping[str, Any]) -> str:
    if "error" in reviews or not isinstance(reviews.get("reviews"), list):
        error = escape(str(reviews.get("error", REVIEWS_UNAVAILABLE)))
        return (
            '<h4 class="text-center text-primary">Error fetching product reviews!</h4>'
            f"<p>{error}</p>"
        )
    parts = []
    for review in reviews["reviews"]:
        rating = review.get("rating") or {}
        stars = ""
        if isinstance(rating, dict):
            if "error" in rating:
                stars = f'<p class="rating-error"><i>{escape(str(rating["error"]))}</i></p>'
            else:
                stars = _stars(rating)
        parts.append(
            "<blockquote>"
            f"<p>{escape(str(review.get('text', '')))}</p>"
            f"<small>{escape(str(review.get('reviewer', '')))}</small>"
            f"{stars}"
            "</blockquote>"
        )
    pod = escape(str(reviews.get("podname", "")))
    parts.append(f'<p class="served-by">Reviews served by: {pod}</p>')
    return "\n".join(parts)


def render_details(details: Mapping[str, Any]) -> str:
    if "error" in details:
        return (
            '<h4 class="text-center text-primary">Error fetching product details!</h4>'
            f"<p>{escape(str(details['error']))}</p>"
        )
    rows = [
        ("Type", details.get("type")),
        ("Pages", details.get("pages")),
        ("Publisher", details.get("publisher")),
        ("Language", details.get("language")),
        ("ISBN-10", details.get("ISBN-10")),
        ("ISBN-13", details.get("ISBN-13")),
    ]
    items = "".join(f"<dt>{name}:</dt><dd>{escape(str(value))}</dd>" for name, value in rows)
    return f"<h4>Book Details</h4><dl>{items}</dl>"


def render_page(
    product: Mapping[str, Any], details: Mapping[str, Any], reviews: Mapping[str, Any], user: str
) -> str:
    """The product page's HTML."""
    if user:
        account = (
            f'<p class="user">Signed in as <b>{escape(user)}</b> <a href="/logout">Sign out</a></p>'
        )
    else:
        account = (
            '<form class="login" method="post" action="/login">'
            '<input type="text" name="username" placeholder="User Name">'
            '<input type="password" name="passwd" placeholder="Password">'
            '<button type="submit">Sign in</button></form>'
        )
    return (
        '<!DOCTYPE html>\n<html><head><meta charset="utf-8">'
        "<title>Simple Bookstore App</title></head><body>\n"
        f'<nav><a href="/">BookInfo Sample</a> {account}</nav>\n'
        f"<h3>{escape(product['title'])}</h3>\n"
        f"<p>{product['descriptionHtml']}</p>\n"
        f'<div class="details">{render_details(details)}</div>\n'
        f'<div class="reviews"><h4>Book Reviews</h4>\n{render_reviews(reviews)}</div>\n'
        "</body></html>\n"
    )


INDEX_HTML = (
    '<!DOCTYPE html>\n<html><head><meta charset="utf-8"><title>Simple Bookstore App</title>'
    "</head><body><h3>Hello! This is a simple bookstore application consisting of three "
    "services as shown below</h3>"
    "<p>productpage (v1) calls details (v1) and reviews (v1, v2, v3); reviews v2 and v3 call "
    "ratings (v1).</p>"
    "<p>Click on one of the links below to auto generate a request to the backend as a real "
    'user or a tester</p><p><a href="/productpage?u=normal">Normal user</a></p>'
    '<p><a href="/productpage?u=test">Test user</a></p></body></html>\n'
)


# --------------------------------------------------------------------------- app


def make_app(settings: Settings) -> web.Application:
    upstreams = Upstreams.from_env(os.environ)
    app = new_app(settings, client=True)

    async def call(
        request: web.Request, url: str, error: str, attempts: int = 1
    ) -> tuple[int, dict[str, Any]]:
        headers = outgoing_headers(
            request.headers, clean_user(request.cookies.get(SESSION_COOKIE, ""))
        )
        status = 500
        for _ in range(attempts):
            try:
                async with request.app[CLIENT_KEY].get(
                    url, headers=headers, timeout=aiohttp.ClientTimeout(total=CALL_TIMEOUT)
                ) as resp:
                    status = resp.status
                    if status == 200:
                        body = await resp.json(content_type=None)
                        if isinstance(body, dict):
                            return 200, body
            except (aiohttp.ClientError, TimeoutError, ValueError):
                status = 500
        return status, {"error": error}

    def details_of(request: web.Request, pid: int) -> Any:
        return call(request, f"{upstreams.details}/details/{pid}", DETAILS_UNAVAILABLE)

    def reviews_of(request: web.Request, pid: int) -> Any:
        return call(
            request, f"{upstreams.reviews}/reviews/{pid}", REVIEWS_UNAVAILABLE, REVIEWS_ATTEMPTS
        )

    def ratings_of(request: web.Request, pid: int) -> Any:
        return call(request, f"{upstreams.ratings}/ratings/{pid}", RATINGS_UNAVAILABLE)

    def product_id(request: web.Request) -> int:
        try:
            return int(request.match_info["id"])
        except ValueError:
            raise web.HTTPBadRequest(text="product id must be a number") from None

    async def index(request: web.Request) -> web.Response:
        return web.Response(text=INDEX_HTML, content_type="text/html")

    async def productpage(request: web.Request) -> web.Response:
        user = clean_user(request.cookies.get(SESSION_COOKIE, ""))
        product = PRODUCTS[0]
        _, details = await details_of(request, product["id"])
        _, reviews = await reviews_of(request, product["id"])
        html = render_page(product, details, reviews, user)
        return web.Response(text=html, content_type="text/html")

    async def login(request: web.Request) -> web.Response:
        form = await request.post()
        user = clean_user(str(form.get("username", "")))
        response = web.Response(status=302, headers={"Location": "/productpage"})
        if user:
            response.set_cookie(SESSION_COOKIE, user, path="/", httponly=True)
        return response

    async def logout(request: web.Request) -> web.Response:
        response = web.Response(status=302, headers={"Location": "/productpage"})
        response.del_cookie(SESSION_COOKIE, path="/")
        return response

    async def products(request: web.Request) -> web.Response:
        return web.json_response(
            [
                {"id": p["id"], "title": p["title"], "descriptionHtml": p["descriptionHtml"]}
                for p in PRODUCTS
            ]
        )

    async def product(request: web.Request) -> web.Response:
        status, body = await details_of(request, product_id(request))
        return web.json_response(body, status=status)

    async def product_reviews(request: web.Request) -> web.Response:
        status, body = await reviews_of(request, product_id(request))
        return web.json_response(body, status=status)

    async def product_ratings(request: web.Request) -> web.Response:
        status, body = await ratings_of(request, product_id(request))
        return web.json_response(body, status=status)

    app.router.add_get("/", index)
    app.router.add_get("/productpage", productpage)
    app.router.add_post("/login", login)
    app.router.add_get("/logout", logout)
    app.router.add_get("/api/v1/products", products)
    app.router.add_get("/api/v1/products/{id}", product)
    app.router.add_get("/api/v1/products/{id}/reviews", product_reviews)
    app.router.add_get("/api/v1/products/{id}/ratings", product_ratings)
    return app


def main() -> int:
    return run(make_app, service="productpage", default_port=9080)


if __name__ == "__main__":
    sys.exit(main())
