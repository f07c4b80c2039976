"""A fortio-like HTTP load generator: bounded runs, status-code histogram, latency percentiles.

``stats`` and ``schedule`` are pure (no I/O, clock injected); ``client`` holds the only socket
code (HTTP/1.1 keep-alive connections parsed by httptools, through ``HTTP_PROXY`` when set);
``runner.run_load`` drives them; ``report`` formats results as text or JSON.
"""

from diktyo.load.report import format_text, to_json
from diktyo.load.runner import LoadOptions, LoadResult, run_load
from diktyo.load.stats import Recorder, percentile

__all__ = [
    "LoadOptions",
    "LoadResult",
    "Recorder",
    "format_text",
    "percentile",
    "run_load",
    "to_json",
]
