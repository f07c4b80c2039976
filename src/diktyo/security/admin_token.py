"""The mesh's admin credential: a random token in ``$DIKTYO_HOME/admin-token`` (mode 0600).

``diktyo up`` / ``demo`` / ``control-plane`` create it when it is missing (``ensure``); the CLI
(``apply``, ``delete``, ``status``, ``proxy-status``, ...) reads it (``read``) and sends it as
``Authorization: Bearer <token>``; the dashboard gets it once in its link (``?token=``) and
keeps it in an HttpOnly cookie. Only the user who owns ``DIKTYO_HOME`` can read the file.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

FILE_NAME = "admin-token"
COOKIE = "diktyo_admin"


def default_home() -> Path:
    return Path(os.environ.get("DIKTYO_HOME") or Path.home() / ".diktyo")


def token_path(home: str | Path | None = None) -> Path:
    return Path(home) / FILE_NAME if home is not None else default_home() / FILE_NAME


def new_token() -> str:
    return secrets.token_urlsafe(32)


def write_secret(path: Path, secret: str) -> None:
    """Write ``secret`` to ``path`` readable by its owner only (0600, created that way)."""
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, secret.encode() + b"\n")
    finally:
        os.close(fd)
    os.replace(tmp, path)


def read(home: str | Path | None = None) -> str | None:
    """The admin token, or None when there is none (no mesh was started in this home)."""
    try:
        text = token_path(home).read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None
    return text or None


def ensure(home: str | Path | None = None) -> str:
    """The admin token of ``home``, created (random, 0600) when missing or unreadable."""
    path = token_path(home)
    token = read(home)
    if token is not None:
        if path.stat().st_mode & 0o077:
            os.chmod(path, 0o600)  # never leave it readable by others
        return token
    token = new_token()
    write_secret(path, token)
    return token


def read_secret_file(path: str | Path) -> str:
    """A token from a file (``--token-file``): ``ValueError`` with a hint when it is unusable."""
    p = Path(path)
    try:
        mode = p.stat().st_mode
        text = p.read_text(encoding="utf-8").strip()
    except OSError as exc:
        raise ValueError(f"cannot read token file {p}: {exc.strerror or exc}") from None
    if mode & 0o077:
        raise ValueError(
            f"token file {p} is readable by other users (mode {mode & 0o777:o}); chmod 600 it"
        )
    if not text:
        raise ValueError(f"token file {p} is empty")
    return text
