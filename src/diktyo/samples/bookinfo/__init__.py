"""A Bookinfo-like application, behaving like Istio's sample so Istio's tasks carry over.

``productpage`` (v1) calls ``details`` (v1) and ``reviews`` (v1, v2, v3); reviews v2 and v3
call ``ratings`` (v1) and show black (v2) or red (v3) stars. Each is a module runnable with
``python -m diktyo.samples.bookinfo.<name>``; all listen on ``PORT`` (default 9080).
"""
