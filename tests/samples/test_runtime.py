"""What the sample apps read from their environment (pure parts)."""

from __future__ import annotations

import pytest

from diktyo.samples.bookinfo.reviews import ReviewsConfig, reviews_body
from diktyo.samples.runtime import ConfigError, Settings, env_url, propagated


def test_settings_defaults_and_overrides() -> None:
    s = Settings.from_env({}, service="reviews", default_port=9080)
    assert (s.service, s.version, s.pod, s.host, s.port, s.log_requests) == (
        "reviews",
        "v1",
        "reviews-v1",
        "127.0.0.1",
        9080,
        True,
    )
    env = {
        "PORT": "0",
        "SERVICE_NAME": "reviews",
        "SERVICE_VERSION": "v2",
        "POD_NAME": "reviews-v2-3",
        "BIND_ADDRESS": "127.0.0.2",
        "HOST": "my-laptop",  # zsh's variable is not ours
        "LOG_REQUESTS": "0",
    }
    s = Settings.from_env(env, service="x", default_port=1)
    assert (s.service, s.version, s.pod, s.host, s.port, s.log_requests) == (
        "reviews",
        "v2",
        "reviews-v2-3",
        "127.0.0.2",
        0,
        False,
    )


@pytest.mark.parametrize(
    ("port", "message"), [("http", "PORT must be a port number"), ("70000", "between 0 and 65535")]
)
def test_bad_port(port: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Settings.from_env({"PORT": port}, service="details", default_port=9080)


def test_env_url() -> None:
    assert env_url({}, "REVIEWS_URL", "http://reviews:9080") == "http://reviews:9080"
    assert (
        env_url({"REVIEWS_URL": "http://127.0.0.1:5/"}, "REVIEWS_URL", "x") == "http://127.0.0.1:5"
    )
    with pytest.raises(ConfigError, match="REVIEWS_URL must be a URL like http://reviews:9080"):
        env_url({"REVIEWS_URL": "reviews"}, "REVIEWS_URL", "http://reviews:9080")


def test_propagated_is_case_insensitive_and_selective() -> None:
    from multidict import CIMultiDict

    headers = CIMultiDict({"X-Request-Id": "r", "Traceparent": "t", "Other": "o"})
    assert propagated(headers, ("x-request-id", "traceparent", "b3")) == {
        "x-request-id": "r",
        "traceparent": "t",
    }


@pytest.mark.parametrize(
    ("version", "env", "enabled", "color", "timeout"),
    [
        ("v1", {}, False, "black", 10.0),
        ("v2", {}, True, "black", 10.0),
        ("v3", {}, True, "red", 2.5),
        ("v4", {"ENABLE_RATINGS": "true", "STAR_COLOR": "green"}, True, "green", 2.5),
        ("v2", {"ENABLE_RATINGS": "false"}, False, "black", 10.0),
    ],
)
def test_reviews_config(
    version: str, env: dict[str, str], enabled: bool, color: str, timeout: float
) -> None:
    config = ReviewsConfig.from_env(env, version)
    assert (config.ratings_enabled, config.star_color, config.ratings_timeout) == (
        enabled,
        color,
        timeout,
    )
    assert config.ratings_url == "http://ratings:9080"


def test_reviews_config_rejects_bad_flag() -> None:
    with pytest.raises(ConfigError, match="ENABLE_RATINGS must be true or false"):
        ReviewsConfig.from_env({"ENABLE_RATINGS": "maybe"}, "v2")


def test_reviews_body() -> None:
    config = ReviewsConfig.from_env({}, "v3")
    body = reviews_body(0, "reviews-v3-1", config, {"Reviewer1": 1, "Reviewer2": "x"})
    assert body["podname"] == "reviews-v3-1" and body["id"] == "0"
    ratings = [r["rating"] for r in body["reviews"]]  # type: ignore[attr-defined]
    assert ratings == [
        {"stars": 1, "color": "red"},
        {"error": "Ratings service is currently unavailable"},
    ]
