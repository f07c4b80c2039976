"""deploy/Dockerfile agrees with what the manifests expect (it cannot be built here: no Docker engine)."""

from __future__ import annotations

from pathlib import Path

from diktyo.control.inject import install
from diktyo.control.inject.config import DEFAULT_CONFIG

DOCKERFILE = Path(__file__).resolve().parents[2] / "deploy" / "Dockerfile"


def _instructions() -> list[tuple[str, str]]:
    out, pending = [], ""
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        if line.strip().startswith("#") or not line.strip():
            continue
        pending += line.rstrip("\\").strip() + " "
        if not line.endswith("\\"):
            op, _, rest = pending.strip().partition(" ")
            out.append((op.upper(), rest))
            pending = ""
    return out


def test_dockerfile_matches_manifests() -> None:
    ins = _instructions()
    assert ins[0] == ("FROM", "python:3.11-slim")
    runs = " ".join(rest for op, rest in ins if op == "RUN")
    assert "pip install --no-cache-dir ." in runs
    assert "iptables" in runs  # diktyo-init runs iptables-restore from this image
    (user,) = [rest for op, rest in ins if op == "USER"]
    uid = int(user.split(":")[0])
    assert uid == DEFAULT_CONFIG.proxy_uid  # never captured by the init container's rules
    (deploy,) = [o for o in install.render() if o["kind"] == "Deployment"]
    assert deploy["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == uid
    copied = [rest.split()[0] for op, rest in ins if op == "COPY"]
    root = DOCKERFILE.parents[1]
    for src in copied:
        assert (root / src).exists(), f"COPY {src}: not in the repository (build context is the root)"
