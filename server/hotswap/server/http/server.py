"""uvicorn inside the server's own event loop, started and stopped by its lifecycle
(api/app.py): it listens from the start (503 while the model loads), refuses new
calls while draining (503), and on stop closes the listener, then gives in-flight
responses up to --drain-seconds to finish.

uvicorn's own `serve()` would install SIGTERM/SIGINT handlers of its own; the
process's drain owns those signals, so only its startup, tick loop and shutdown run."""
from __future__ import annotations

import asyncio
import socket
import ssl

import uvicorn

from ..api.state import ServerState
from .app import build_app



def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


class HTTPServer:
    def __init__(self, state: ServerState, base_name: str) -> None:
        opts = state.opts
        self.base_name = base_name
        tls = {}
        if opts.tls_cert:  # the same certificate (and client CA, for mutual TLS) as gRPC
            tls = {"ssl_certfile": opts.tls_cert, "ssl_keyfile": opts.tls_key}
            if opts.tls_client_ca:
                tls.update(ssl_ca_certs=opts.tls_client_ca, ssl_cert_reqs=ssl.CERT_REQUIRED)
        config = uvicorn.Config(build_app(state, base_name), log_config=None, access_log=False, lifespan="off",
                                timeout_graceful_shutdown=opts.drain_seconds, server_header=False, **tls)
        self.server = uvicorn.Server(config)
        self.sock = _bind(opts.host, opts.http_port)
        self.port: int = self.sock.getsockname()[1]
        self._ticks: asyncio.Task | None = None

    async def start(self) -> None:
        self.server.config.load()
        self.server.lifespan = self.server.config.lifespan_class(self.server.config)
        await self.server.startup(sockets=[self.sock])
        self._ticks = asyncio.create_task(self.server.main_loop())  # Date header, keep-alive housekeeping

    async def stop(self) -> None:
        """Stop accepting, let in-flight responses finish (up to the drain time), close."""
        self.server.should_exit = True
        if self._ticks is not None:
            await self._ticks
        await self.server.shutdown(sockets=[self.sock])
