"""Bookinfo's reviews service, v1/v2/v3 in one module (version from ``SERVICE_VERSION``).

``GET /reviews/<id>`` returns two reviews and ``podname`` (the ``POD_NAME`` of this instance),
as Istio's reviews does. v1 shows no ratings; v2 calls ratings and shows black stars; v3 calls
ratings and shows red stars. The call to ratings times out after 10 s (black stars) or 2.5 s
(other colours), as in Istio's reviews; when it fails the review carries the error
"Ratings service is currently unavailable". ``end-user`` and trace headers are forwarded.

Env besides :mod:`diktyo.samples.runtime`'s: ``RATINGS_URL`` (default ``http://ratings:9080``);
``ENABLE_RATINGS`` (``true``/``false``) and ``STAR_COLOR`` override what the version implies,
as in Istio's reviews image (so e.g. a ``v4`` can be made from them).
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from diktyo.samples.runtime import (
    CLIENT_KEY,
    CONTEXT_HEADERS,
    TRACE_HEADERS,
    ConfigError,
    Settings,
    env_url,
    new_app,
    propagated,
    run,
)

RATINGS_UNAVAILABLE = "Ratings service is currently unavailable"
FORWARDED = TRACE_HEADERS + ("end-user",) + CONTEXT_HEADERS
REVIEWS = (
    (
        "Reviewer1",
        "An extremely entertaining play by Shakespeare. The slapstick humour is refreshing!",
    ),
    (
        "Reviewer2",
        (
            "Absolutely fun and entertaining. The play lacks thematic depth when compared "
            "to other plays by Shakespeare."
        ),
    ),
)


@dataclass(frozen=True, slots=True)
class ReviewsConfig:
    ratings_enabled: bool
    star_color: str
    ratings_url: str

    @property
    def ratings_timeout(self) -> float:
        """Istio's reviews waits 10 s for ratings with black stars, 2.5 s otherwise."""
        return 10.0 if self.star_color == "black" else 2.5

    @classmethod
    def from_env(cls, env: Mapping[str, str], version: str) -> ReviewsConfig:
        enabled = version in ("v2", "v3")
        color = "red" if version == "v3" else "black"
        raw = env.get("ENABLE_RATINGS", "").strip().lower()
        if raw:
            if raw not in ("true", "false", "1", "0"):
                raise ConfigError(f"ENABLE_RATINGS must be true or false, got {raw!r}")
            enabled = raw in ("true", "1")
        color = env.get("STAR_COLOR", "").strip() or color
        return cls(enabled, color, env_url(env, "RATINGS_URL", "http://ratings:9080"))


def reviews_body(
    product_id: int, pod: str, config: ReviewsConfig, ratings: Mapping[str, object] | None
) -> dict[str, object]:
    """The JSON reviews returns; ``ratings`` is what ratings said (None: it failed)."""
    reviews: list[dict[str, object]] = []
    for reviewer, text in REVIEWS:
        review: dict[str, object] = {"reviewer": reviewer, "text": text}
        if config.ratings_enabled:
            stars = ratings.get(reviewer) if ratings is not None else None
            if isinstance(stars, int):
                review["rating"] = {"stars": stars, "color": config.star_color}
            else:
                review["rating"] = {"error": RATINGS_UNAVAILABLE}
        reviews.append(review)
    return {"id": str(product_id), "podname": pod, "clustername": "null", "reviews": reviews}


def make_app(settings: Settings) -> web.Application:
    config = ReviewsConfig.from_env(os.environ, settings.version)
    app = new_app(settings, client=config.ratings_enabled)

    async def fetch_ratings(request: web.Request, product_id: int) -> Mapping[str, object] | None:
        headers = propagated(request.headers, FORWARDED)
        url = f"{config.ratings_url}/ratings/{product_id}"
        try:
            async with request.app[CLIENT_KEY].get(
                url, headers=headers, timeout=aiohttp.ClientTimeout(total=config.ratings_timeout)
            ) as resp:
                if resp.status != 200:
                    return None
                body = await resp.json(content_type=None)
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return None
        ratings = body.get("ratings") if isinstance(body, dict) else None
        return ratings if isinstance(ratings, dict) else None

    async def reviews(request: web.Request) -> web.Response:
        try:
            product_id = int(request.match_info["id"])
        except ValueError:
            return web.json_response({"error": "please provide numeric product id"}, status=400)
        ratings = await fetch_ratings(request, product_id) if config.ratings_enabled else None
        return web.json_response(reviews_body(product_id, settings.pod, config, ratings))

    app.router.add_get("/reviews/{id}", reviews)
    return app


def main() -> int:
    return run(make_app, service="reviews", default_port=9080)


if __name__ == "__main__":
    sys.exit(main())
