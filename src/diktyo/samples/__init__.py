"""Sample applications that come with diktyo: a Bookinfo-like app and an httpbin-like service.

Run them with ``python -m diktyo.samples.bookinfo.productpage`` (details, reviews, ratings) and
``python -m diktyo.samples.httpbin``; see :mod:`diktyo.samples.runtime` for the environment they
read, and ``docs/bookinfo.md``.
"""
