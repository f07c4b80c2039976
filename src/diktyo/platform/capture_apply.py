"""Installing and removing capture rules with ``iptables-restore``, optionally in a netns.

Backend: Debian 12 ships ``iptables`` 1.8.9 whose default (``update-alternatives``) is the
nf_tables backend (``iptables-nft``); the legacy x_tables backend is there too. Rules are
written in ``iptables-restore`` syntax either way (what ``istio-iptables`` writes), and
installed by ``iptables-nft-restore`` when it exists, else ``iptables-legacy-restore``, else
plain ``iptables-restore``. Inside a network namespace diktyo created, either backend affects
that namespace only. See docs/transparent.md.
"""

from __future__ import annotations

import shutil
import subprocess
from dataclasses import dataclass

from diktyo.platform.capture_rules import CaptureConfig, cleanup_commands, render

BACKENDS = {
    "nft": ("iptables-nft", "iptables-nft-restore", "iptables-nft-save"),
    "legacy": ("iptables-legacy", "iptables-legacy-restore", "iptables-legacy-save"),
    "default": ("iptables", "iptables-restore", "iptables-save"),
}


class CaptureApplyError(RuntimeError):
    """Rules could not be installed; the message has iptables' own words and a hint."""


@dataclass(frozen=True, slots=True)
class Backend:
    name: str
    iptables: str
    restore: str
    save: str


def find_backend(preferred: str = "auto") -> Backend:
    """The iptables tools to use: ``nft`` | ``legacy`` | ``default`` | ``auto`` (nft, then
    legacy, then the alternatives default). Raises ``CaptureApplyError`` when none exists."""
    order = ["nft", "legacy", "default"] if preferred == "auto" else [preferred]
    for name in order:
        if name not in BACKENDS:
            raise CaptureApplyError(f"unknown iptables backend {name!r}: use nft, legacy or auto")
        tools = BACKENDS[name]
        paths = [shutil.which(t) for t in tools]
        if all(paths):
            return Backend(name, *(str(p) for p in paths))
    raise CaptureApplyError(
        "iptables is not installed (need iptables-restore): on Debian/Ubuntu "
        "'apt-get install iptables iproute2'"
    )


def _in_netns(netns: str | None, argv: list[str]) -> list[str]:
    return ["ip", "netns", "exec", netns, *argv] if netns else argv


def apply(cfg: CaptureConfig, *, netns: str | None = None, backend: Backend | None = None) -> str:
    """Install ``cfg``'s rules (in ``netns``, or the current namespace), replacing an earlier
    install of the same chains. Returns the rules text installed."""
    backend = backend or find_backend()
    text = render(cfg)
    remove(cfg, netns=netns, backend=backend)
    if not text:
        return text
    proc = subprocess.run(
        _in_netns(netns, [backend.restore, "--noflush"]),
        input=text,
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        where = f" in network namespace {netns}" if netns else ""
        raise CaptureApplyError(
            f"{backend.restore}{where} failed (exit {proc.returncode}): "
            f"{proc.stderr.strip() or proc.stdout.strip()} (hint: needs root or CAP_NET_ADMIN, "
            "and the kernel's nat table with the owner and multiport matches)"
        )
    return text


def remove(cfg: CaptureConfig, *, netns: str | None = None, backend: Backend | None = None) -> int:
    """Remove the jumps and ISTIO_* chains ``cfg`` would install; returns how many iptables
    commands succeeded (0 = nothing was installed)."""
    backend = backend or find_backend()
    done = 0
    for args in cleanup_commands(cfg):
        proc = subprocess.run(
            _in_netns(netns, [backend.iptables, "-w", *args]),
            capture_output=True,
            text=True,
            check=False,
        )
        done += proc.returncode == 0
    return done


def saved(*, netns: str | None = None, backend: Backend | None = None) -> str:
    """``iptables-save -t nat`` output (what is installed now)."""
    backend = backend or find_backend()
    proc = subprocess.run(
        _in_netns(netns, [backend.save, "-t", "nat"]),
        capture_output=True,
        text=True,
        check=False,
    )
    if proc.returncode != 0:
        raise CaptureApplyError(f"{backend.save} failed: {proc.stderr.strip()}")
    return proc.stdout
