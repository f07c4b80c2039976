"""Bookinfo's ratings service (v1): ``GET /ratings/<id>`` returns the stars each reviewer gave.

Like Istio's ratings, some ``SERVICE_VERSION`` values make it misbehave on purpose (for
outlier detection and resilience demos): ``v-faulty`` answers 503 to about half of the
requests, ``v-delayed`` delays about half of them by 7 s, ``v-unavailable`` always answers 503.
"""

from __future__ import annotations

import asyncio
import sys

from aiohttp import web

from diktyo.core.clock import make_random
from diktyo.samples.runtime import Settings, new_app, run

RATINGS = {"Reviewer1": 5, "Reviewer2": 4}
DELAY_SECONDS = 7.0


def make_app(settings: Settings) -> web.Application:
    app = new_app(settings)
    rng = make_random()
    version = settings.version

    async def ratings(request: web.Request) -> web.Response:
        try:
            product_id = int(request.match_info["id"])
        except ValueError:
            return web.json_response({"error": "please provide numeric product ID"}, status=400)
        if version == "v-unavailable" or (version == "v-faulty" and rng.random() < 0.5):
            return web.json_response({"error": "Service unavailable"}, status=503)
        if version == "v-delayed" and rng.random() < 0.5:
            await asyncio.sleep(DELAY_SECONDS)
        return web.json_response({"id": product_id, "ratings": RATINGS})

    app.router.add_get("/ratings/{id}", ratings)
    return app


def main() -> int:
    return run(make_app, service="ratings", default_port=9080)


if __name__ == "__main__":
    sys.exit(main())
