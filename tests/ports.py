"""Loopback ports for the servers the tests start."""
from __future__ import annotations

import socket


def free_port() -> int:
    """A port nobody holds on 127.0.0.1 right now (the server started next binds it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
