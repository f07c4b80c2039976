"""What the control plane sends a sidecar: frozen structs and one wire format (JSON)."""

from diktyo.snapshot.codec import SnapshotError, decode, encode, from_builtins, to_builtins
from diktyo.snapshot.model import *  # noqa: F403  # the package re-exports the model

__all__ = ["SnapshotError", "decode", "encode", "from_builtins", "to_builtins"]
