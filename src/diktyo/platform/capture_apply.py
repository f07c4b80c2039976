"""Installing and removing capture rules with ``iptables-restore``, optionally in a netns.

Backend: Debian 12 ships ``iptables`` 1.8.9 whose default (``update-alternatives``) is the
nf_tables backend (``iptables-nft``); the legacy x_tables backend is there too. Rules are
written in ``iptables-restore`` syntax either way (what ``istio-iptables`` writes), and
installed by ``iptables-nft-restore`` when it exists, else ``iptables-legacy-restore``, else
plain ``iptables-restore``. Inside a network namespace diktyo created, either backend affects
that namespace only. See docs/transparent.md.
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass

from diktyo.platform.capture_rules import CaptureConfig, render

# an excluded interface's rule as build_rules writes it (and iptables-save prints it)
_IFACE_RETURN = re.compile(r"-A (?:PREROUTING -i|OUTPUT -o) \S+ -j RETURN")

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


def remove(
    cfg: CaptureConfig | None = None, *, netns: str | None = None, backend: Backend | None = None
) -> int:
    """Remove what ``build_rules`` installs, whatever the settings it was installed with: read
    the nat table, delete the built-in chains' jumps to ``ISTIO_*`` and, when ``ISTIO_*``
    chains exist, the ``-i IFACE -j RETURN`` / ``-o IFACE -j RETURN`` rules of excluded
    interfaces, then flush and delete the ``ISTIO_*`` chains. Returns how many rules and
    chains were removed (0 = nothing was installed). ``cfg`` is accepted for symmetry."""
    del cfg
    backend = backend or find_backend()
    table = saved(netns=netns, backend=backend)
    chains = [ln[1:].split()[0] for ln in table.splitlines() if ln.startswith(":ISTIO_")]
    doomed: list[list[str]] = []
    for line in table.splitlines():
        if not line.startswith(("-A PREROUTING ", "-A OUTPUT ")):
            continue
        parts = line.split()
        target = parts[parts.index("-j") + 1] if "-j" in parts[:-1] else ""
        excluded_iface = bool(chains) and _IFACE_RETURN.fullmatch(line) is not None
        if target.startswith("ISTIO_") or excluded_iface:
            doomed.append(["-t", "nat", "-D", *parts[1:]])
    doomed += [["-t", "nat", "-F", c] for c in chains]
    doomed += [["-t", "nat", "-X", c] for c in chains]
    done = 0
    for args in doomed:
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
