"""What the services share: the serving core once it is loaded, and the lifecycle."""
from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from ..errors import Unavailable
from .events import StepEventPump

if TYPE_CHECKING:
    from ..metrics import Metrics
    from ..options import ServerOptions
    from ..serving import ServingCore


class ServerState:
    def __init__(self, opts: ServerOptions, metrics: Metrics) -> None:
        self.opts = opts
        self.metrics = metrics
        self.core: ServingCore | None = None
        self.draining = False
        self.inflight = 0
        """Generations (gRPC and HTTP) accepted and not yet finished (the drain waits for these)."""
        self.calls = 0
        """gRPC calls in flight but open-ended streams (interceptors.CallCounter; the drain waits for these too)."""
        self._pump: StepEventPump | None = None
        self._pump_core: ServingCore | None = None

    def ready(self) -> ServingCore:
        """The core, or UNAVAILABLE while starting or draining (clients retry elsewhere)."""
        if self.draining:
            raise Unavailable("the server is draining (shutting down); retry on another replica")
        if self.core is None:
            raise Unavailable("the server is starting: the base model is still loading")
        return self.core

    def event_pump(self, core: ServingCore) -> StepEventPump:
        """One per serving core, shared by gRPC and HTTP, created on the server's event loop at the first call."""
        if self._pump is None or self._pump_core is not core:
            self._pump, self._pump_core = StepEventPump(asyncio.get_running_loop()), core
            core.loop.step_listeners.append(self._pump.flush)
        return self._pump
