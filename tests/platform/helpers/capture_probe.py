"""Probe for capture tests, run inside a network namespace (``ip netns exec NS python ...``).

``listen PORT...``: accept on 0.0.0.0:PORT for each port; per connection print one JSON line
``{"port": P, "peer": IP, "orig": "IP:PORT"}`` (``SO_ORIGINAL_DST``) and answer ``ok``.
Prints ``{"ready": true}`` once listening.
``connect HOST PORT [UID]``: connect (as UID if given), print ``{"reply": ...}`` or
``{"error": errno-name}``.
"""

from __future__ import annotations

import encodings.idna  # noqa: F401 - loaded before setuid (a uid that cannot read the stdlib)
import errno
import json
import os
import selectors
import socket
import struct
import sys

SO_ORIGINAL_DST = 80


def orig_dst(conn: socket.socket) -> str:
    raw = conn.getsockopt(socket.SOL_IP, SO_ORIGINAL_DST, 16)
    port = struct.unpack("!H", raw[2:4])[0]
    return f"{socket.inet_ntoa(raw[4:8])}:{port}"


def listen(ports: list[int]) -> None:
    sel = selectors.DefaultSelector()
    for p in ports:
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("0.0.0.0", p))
        s.listen(16)
        sel.register(s, selectors.EVENT_READ, p)
    print(json.dumps({"ready": True}), flush=True)
    while True:
        for key, _ in sel.select():
            conn, peer = key.fileobj.accept()  # type: ignore[union-attr]
            try:
                orig = orig_dst(conn)
            except OSError:
                orig = ""
            print(json.dumps({"port": key.data, "peer": peer[0], "orig": orig}), flush=True)
            conn.sendall(b"ok")
            conn.close()


def connect(host: str, port: int, uid: int | None) -> None:
    if uid is not None:
        os.setgroups([])
        os.setgid(uid)
        os.setuid(uid)
    try:
        with socket.create_connection((host, port), timeout=2) as s:
            print(json.dumps({"reply": s.recv(16).decode()}), flush=True)
    except OSError as exc:
        name = errno.errorcode.get(exc.errno or 0, type(exc).__name__)
        print(json.dumps({"error": name}), flush=True)


if __name__ == "__main__":
    if sys.argv[1] == "listen":
        listen([int(p) for p in sys.argv[2:]])
    else:
        connect(sys.argv[2], int(sys.argv[3]), int(sys.argv[4]) if len(sys.argv) > 4 else None)
