"""diktyo.telemetry: Istio's metrics, trace propagation, OTLP export, access logs, embedded store.

Modules (import the one you need; nothing is re-exported so the sidecar loads only its part):

- ``istio_metrics``  ``IstioMetrics`` (hot path ``record``), ``PeerLabels``, ``WorkloadInfo``
- ``stats``          every exported stat declared once (Envoy-style stats lists), ``collect``
- ``exposition``     ``render(*collectors)``, ``CONTENT_TYPE`` for ``/stats/prometheus``
- ``tracing``        ``extract``, ``start_span``, ``inject``, ``Sampler``, ``Span``
- ``otlp``           ``OtlpExporter``, ``encode_spans``, ``decode_spans``
- ``access_log``     ``AccessRecord``, ``format_record`` (Istio text / JSON), the sidecar's formatter
- ``store``          ``MetricStore`` (edge ring), ``TraceStore`` (SQLite)
- ``scrape``         ``Scraper`` (sidecars' /stats/prometheus -> MetricStore)
- ``http``           ``setup_routes(app, metrics, traces)`` for the control plane (aiohttp)
- ``promql``         the one PromQL builder (Prometheus source, Grafana dashboards)
- ``prometheus_source``  ``PrometheusSource``: the dashboard's graph/series from Prometheus
- ``prometheus_config``  ``scrape_config(targets)`` for a real Prometheus
"""
