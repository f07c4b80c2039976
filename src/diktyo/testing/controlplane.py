"""Talking to a control plane from tests: its admin credential, content types, a CLI home.

async with admin_session(cp) as s:                     # Authorization: Bearer <admin>
    await s.post(cp.url + "/v1/config", data=yaml_text, headers=YAML)
    await s.post(cp.url + "/v1/registry/services", data=msgspec.json.encode(svc), headers=JSON)
env = cli_env(cp, tmp_path)   # DIKTYO_HOME with cp's admin-token (0600) for 'diktyo apply'
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import aiohttp

from diktyo.security.admin_token import token_path, write_secret

JSON = {"Content-Type": "application/json"}
YAML = {"Content-Type": "application/yaml"}


def admin_token_of(obj: Any) -> str:
    """The admin token of a ``ControlPlane``, a ``LocalMesh`` or a ``MeshThread``."""
    for path in (("admin_token",), ("cp", "admin_token"), ("mesh", "cp", "admin_token")):
        value = obj
        for name in path:
            value = getattr(value, name, None)
        if isinstance(value, str):
            return value
    raise TypeError(f"{type(obj).__name__} has no control plane admin token")


def admin_headers(cp: Any, content_type: str | None = None) -> dict[str, str]:
    """``Authorization`` (and optionally ``Content-Type``) for ``cp`` (a ``ControlPlane``, a
    ``LocalMesh`` or a ``MeshThread``)."""
    token = admin_token_of(cp)
    headers = {"Authorization": f"Bearer {token}"}
    if content_type:
        headers["Content-Type"] = content_type
    return headers


def admin_session(cp: Any, **kwargs: Any) -> aiohttp.ClientSession:
    """An aiohttp session that sends ``cp``'s admin credential with every request."""
    return aiohttp.ClientSession(headers=admin_headers(cp), **kwargs)


def write_admin_token(cp: Any, home: str | Path) -> Path:
    """Put ``cp``'s admin token where the CLI looks for it (``HOME/admin-token``, 0600)."""
    path = token_path(home)
    write_secret(path, admin_token_of(cp))
    return path


def cli_env(cp: Any, home: str | Path) -> dict[str, str]:
    """``os.environ`` with ``DIKTYO_HOME=home`` holding ``cp``'s admin token, for CLI runs."""
    write_admin_token(cp, home)
    return {**os.environ, "DIKTYO_HOME": str(home)}


def admin_get(cp: Any, url: str, timeout: float = 10.0) -> tuple[int, str]:
    """``GET url`` on the control plane with its admin credential (no proxy): (status, text)."""
    req = urllib.request.Request(url, headers=admin_headers(cp))
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    try:
        with opener.open(req, timeout=timeout) as r:
            return r.status, r.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode("utf-8", "replace")


__all__ = [
    "JSON",
    "YAML",
    "admin_get",
    "admin_headers",
    "admin_session",
    "admin_token_of",
    "cli_env",
    "write_admin_token",
]
