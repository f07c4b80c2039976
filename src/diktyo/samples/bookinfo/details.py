"""Bookinfo's details service (v1): ``GET /details/<id>`` returns the book's details as JSON."""

from __future__ import annotations

import sys

from aiohttp import web

from diktyo.samples.runtime import Settings, new_app, run


def book_details(product_id: int) -> dict[str, object]:
    """The details Istio's details service returns for every product id."""
    return {
        "id": product_id,
        "author": "William Shakespeare",
        "year": 1595,
        "type": "paperback",
        "pages": 200,
        "publisher": "PublisherA",
        "language": "English",
        "ISBN-10": "1234567890",
        "ISBN-13": "123-1234567890",
    }


def make_app(settings: Settings) -> web.Application:
    app = new_app(settings)

    async def details(request: web.Request) -> web.Response:
        try:
            product_id = int(request.match_info["id"])
        except ValueError:
            return web.json_response({"error": "please provide numeric product id"}, status=400)
        return web.json_response(book_details(product_id))

    app.router.add_get("/details/{id}", details)
    return app


def main() -> int:
    return run(make_app, service="details", default_port=9080)


if __name__ == "__main__":
    sys.exit(main())
