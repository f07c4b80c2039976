"""Talking to a control plane from tests: its admin credential, content types, a CLI home.

async with admin_session(cp) as s:                     # Authorization: Bearer <admin>
    await s.post(cp.url + "/v1/config", data=yaml_text, headers=YAML)
    await s.post(cp.url + "/v1/registry/services", data=msgspec.json.encode(svc), headers=JSON)
env = cli_env(cp, tmp_path)   # DIKTYO_HOME with cp's admin-token (0600) for 'diktyo apply'
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import aiohttp

from diktyo.security.admin_token import token_path, write_secret

JSON = {"Content-Type": "application/json"}
YAML = {"Content-Type": "application/yaml"}


def admin_headers(cp: Any, content_type: str | None = None) -> dict[str, str]:
    """``Authorization`` (and optionally ``Content-Type``) for ``cp`` (a ``ControlPlane``, or
    anything with ``admin_token``, e.g. a ``LocalMesh``'s ``cp``)."""
    token = cp.admin_token if hasattr(cp, "admin_token") else cp.cp.admin_token
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
    write_secret(path, cp.admin_token if hasattr(cp, "admin_token") else cp.cp.admin_token)
    return path


def cli_env(cp: Any, home: str | Path) -> dict[str, str]:
    """``os.environ`` with ``DIKTYO_HOME=home`` holding ``cp``'s admin token, for CLI runs."""
    write_admin_token(cp, home)
    return {**os.environ, "DIKTYO_HOME": str(home)}


__all__ = ["JSON", "YAML", "admin_headers", "admin_session", "cli_env", "write_admin_token"]
