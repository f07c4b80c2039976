"""Test tiers: markers by directory, so no test file has to carry them; parallel runs.

``make test-fast`` runs ``-m "not (e2e or browser or bench or slow)"``: pure and socket-level
tests (real sidecars and upstreams on 127.0.0.1 are fine). ``make test`` runs everything.
A test elsewhere that starts a whole mesh marks itself ``@pytest.mark.slow``.

Both targets run under pytest-xdist (``-n 3 --dist loadgroup --no-loadscope-reorder``, see
docs/testing.md). Under xdist every test gets an ``xdist_group``: its module (so module-scoped
fixtures, such as a whole mesh, are built once), or one named group for modules that share a
machine-wide resource (``SHARED_RESOURCE_GROUPS``), which then run one after the other on one
worker. Each worker has its own ``$DIKTYO_HOME`` and its own slice of ``$DIKTYO_PORT_RANGE``.
Plain ``pytest`` (no ``-n``) is unchanged.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import pytest

TESTS = Path(__file__).resolve().parent

# Local meshes default to 'capture: auto' (transparent when run as root); the suite's meshes
# are written for proxy mode (HTTP_PROXY, app ports on 127.0.0.1). Transparent-mode tests set
# 'capture:' in their mesh files, which wins over this (docs/transparent.md).
os.environ.setdefault("DIKTYO_CAPTURE", "proxy")

# pytest-xdist worker id ("gw0", ...) or None in a plain run
XDIST_WORKER = os.environ.get("PYTEST_XDIST_WORKER")

PORT_SLOTS = 6


def _port_range_per_worker(worker: str) -> None:
    """Each worker's meshes (and their `diktyo up` children) pick ports from a slice of its own
    of diktyo's port range (``DIKTYO_PORT_RANGE``, diktyo.platform.ports): a port one worker's
    supervisor picked and its sidecar binds seconds later is never picked by another worker.
    The slices of a run start at a slot drawn from the run's id, so two runs on one machine
    (two developers) seldom share slices."""
    from diktyo.platform.ports import RANGE_ENV, port_range

    count = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    rng = None if RANGE_ENV in os.environ else port_range()
    if rng is None or not 0 < count <= PORT_SLOTS or not worker.startswith("gw"):
        return
    lo, hi = rng
    size = (hi - lo + 1) // PORT_SLOTS
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID", "")
    first = int(hashlib.sha256(run.encode()).hexdigest(), 16) % PORT_SLOTS
    slot = (first + int(worker[2:])) % PORT_SLOTS
    os.environ[RANGE_ENV] = f"{lo + slot * size}-{lo + (slot + 1) * size - 1}"


if XDIST_WORKER is not None:
    # `diktyo up`/`demo`, the control plane's admin token and the sidecars' files live in
    # $DIKTYO_HOME (default ~/.diktyo, and `up` refuses while mesh.json names a live mesh):
    # one home per worker, so two meshes on two workers never see each other's state.
    _home = tempfile.mkdtemp(prefix=f"diktyo-test-{XDIST_WORKER}-")
    os.environ["DIKTYO_HOME"] = _home
    atexit.register(shutil.rmtree, _home, ignore_errors=True)
    _port_range_per_worker(XDIST_WORKER)

# Modules that share something machine-wide: one group each, so under xdist they run on one
# worker, one at a time (paths relative to tests/; a folder takes every module below it).
SHARED_RESOURCE_GROUPS = {
    # (1) the transparent mesh's bridge and /etc/netns, network namespaces, iptables, uid 1337;
    # a transparent mesh removes a crashed run's leftovers under its name prefixes on start.
    # (2) tests that load the whole machine on purpose (benchmark smoke runs: wrk at full
    # speed, cores pinned) and tests that assert "no request fails" while processes are killed
    # or certificates rotate under load: never two of these at the same time.
    "host": (
        "proxy/capture/test_tcp_capture_netns.py",
        "proxy/capture/test_capture_redis_mtls.py",
        "platform/test_platform_netns.py",
        "platform/test_platform_transparent.py",
        "platform/test_platform_users.py",
        "platform/test_join.py",
        "e2e/test_e2e_transparent.py",
        "e2e/test_e2e_fleet_netns.py",
        "e2e/test_e2e_redis_transparent.py",
        "bench",
        "e2e/test_e2e_supervision.py",
        "e2e/test_e2e_supervisor_death.py",
        "integration/test_mtls_rotation.py",
    ),
    # real etcd clusters (3 members each, heavy on CPU and fsync): one at a time
    "etcd": (
        "control/etcd",
        "cli/test_control_plane_store_cli.py",
        "control/serve/test_serve_sources.py",
        "e2e/test_e2e_etcd_faults.py",
    ),
    # one Bookinfo mesh per session shared by these modules (``bookinfo_mesh`` in
    # tests/e2e/conftest.py): on one worker, so it is booted once
    "bookinfo": (
        "e2e/test_e2e_bookinfo.py",
        "e2e/test_tasks_traffic.py",
        "e2e/test_explain_from_mesh.py",
    ),
}

# Under xdist, groups are handed out in collection order (--no-loadscope-reorder): the long
# ones first, so no worker starts a long module while the others are already done.
FIRST = ("host", "e2e", "etcd", "browser", "bench", "slow")

# first path part below tests/ -> marker given to every test collected there
DIRECTORY_MARKERS = {
    "e2e": "e2e",  # whole local meshes (control plane, sidecars, sample apps)
    "browser": "browser",  # headless Chromium
    "bench": "bench",  # benchmark harness smoke runs
}


ISTIO_CRDS = TESTS.parent.parent / "shared" / "istio" / "customresourcedefinitions.gen.yaml"


@pytest.fixture(scope="session")
def istio_crd_docs() -> list[dict[str, Any]]:
    """The documents of Istio's ``customresourcedefinitions.gen.yaml`` (0.9 MB), parsed once per
    session. libyaml (PyYAML's C loader) reads it in ~0.1 s where the pure-Python YAML parser
    takes 2-3 s; the two give the same documents for this file (plain JSON-like YAML)."""
    if not ISTIO_CRDS.exists():
        pytest.skip(f"Istio CRDs not found at {ISTIO_CRDS} (shared/ must sit beside the repo)")
    text = ISTIO_CRDS.read_text(encoding="utf-8")
    try:
        import yaml

        docs = list(yaml.load_all(text, Loader=yaml.CSafeLoader))
    except (ImportError, AttributeError):  # no libyaml here: the slower parser, same result
        from ruamel.yaml import YAML

        docs = list(YAML(typ="safe").load_all(text))
    return [d for d in docs if d]


def _group(rel: Path) -> str:
    """The xdist group of the module at ``rel`` (relative to tests/)."""
    for name, paths in SHARED_RESOURCE_GROUPS.items():
        for p in paths:
            if rel == Path(p) or Path(p) in rel.parents:
                return name
    return rel.as_posix()


def _rank(item: pytest.Item, group: str) -> int:
    if group in FIRST:
        return FIRST.index(group)
    for i, mark in enumerate(FIRST):
        if item.get_closest_marker(mark) is not None:
            return i
    return len(FIRST)


# Seconds each group took in the last runs (pytest's cache, ``.pytest_cache``): within a rank
# the longest groups are handed out first (longest-processing-time first), so the run does not
# end with one worker busy on a long module the others could have shared out. A fresh clone
# has no cache yet and runs in collection order.
DURATIONS_KEY = "diktyo/group-seconds"
_seconds: dict[str, float] = {}


def _group_of_nodeid(rootpath: Path, nodeid: str) -> str | None:
    try:
        return _group((rootpath / nodeid.split("::", 1)[0]).resolve().relative_to(TESTS))
    except ValueError:
        return None


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if XDIST_WORKER is None and _ROOT:  # the controller (or a plain run) sees every report
        group = _group_of_nodeid(_ROOT[0], report.nodeid)
        if group is not None:
            _seconds[group] = _seconds.get(group, 0.0) + report.duration


_ROOT: list[Path] = []


def pytest_configure(config: pytest.Config) -> None:
    _ROOT[:] = [config.rootpath]


def pytest_sessionfinish(session: pytest.Session) -> None:
    cache = getattr(session.config, "cache", None)  # absent with -p no:cacheprovider
    if XDIST_WORKER is None and _seconds and cache is not None:
        known = dict(cache.get(DURATIONS_KEY, {}))
        known.update({g: round(t, 2) for g, t in _seconds.items()})
        cache.set(DURATIONS_KEY, known)


@pytest.hookimpl(tryfirst=True)  # before xdist appends the group to the node ids
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    groups: dict[str, str] = {}
    for item in items:
        try:
            rel = Path(item.path).resolve().relative_to(TESTS)
            top = rel.parts[0]
        except (ValueError, IndexError):
            continue
        marker = DIRECTORY_MARKERS.get(top)
        if marker is not None:
            item.add_marker(marker)
        if XDIST_WORKER is not None:
            group = groups[item.nodeid] = _group(rel)
            item.add_marker(pytest.mark.xdist_group(group))
    if XDIST_WORKER is not None:
        # a group's rank is its first test's; within a rank the longest groups of the last
        # runs first, then collection order (every worker reads the same cache: same order)
        cache = getattr(config, "cache", None)  # absent with -p no:cacheprovider
        seconds: dict[str, float] = cache.get(DURATIONS_KEY, {}) if cache is not None else {}
        key: dict[str, tuple[int, float, int]] = {}
        for i, item in enumerate(items):
            g = groups.get(item.nodeid, "")
            if g not in key:
                key[g] = (_rank(item, g), -float(seconds.get(g, 0.0)), i)
        items.sort(key=lambda item: key[groups.get(item.nodeid, "")])


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist (absent with -p no:xdist)
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``--dist loadgroup`` with the groups above, taken from each test's path.

    pytest-xdist's own loadgroup reads the group from a ``@group`` suffix it appends to the node
    id of each test with an ``xdist_group`` mark; since pytest 9.2 (node ids derived from
    ``Node._id``) that append has no effect, every test became a group of its own, and the
    ``host`` / ``etcd`` / ``bookinfo`` groups and module-scoped fixtures were spread over all
    workers. The controller computes the groups here instead (the marks above stay for a
    plain xdist that honours them)."""
    if config.getvalue("dist") != "loadgroup":
        return None
    from xdist.scheduler import LoadGroupScheduling

    rootpath = config.rootpath

    class PathGroupScheduling(LoadGroupScheduling):  # type: ignore[misc]
        def _split_scope(self, nodeid: str) -> str:
            scope: str = super()._split_scope(nodeid)
            if scope != nodeid:  # an "@group" suffix: xdist's own grouping works
                return scope
            try:
                rel = (rootpath / nodeid.split("::", 1)[0]).resolve().relative_to(TESTS)
            except ValueError:
                return nodeid.split("::", 1)[0]
            return _group(rel)

    return PathGroupScheduling(config, log)
