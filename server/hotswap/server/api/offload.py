"""Blocking work the services hand off the event loop.

Database reads and writes (SQLite, or PostgreSQL over the network) and file I/O
can take milliseconds to seconds under load; on the loop they would stall every
stream. One bounded pool: each of its threads keeps its own connection (SqlDb
is thread-local), and a burst of calls queues here instead of opening more.
"""
from __future__ import annotations

import asyncio
import functools
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, TypeVar

from ..cpu_threads import serial

T = TypeVar("T")

BLOCKING_POOL = ThreadPoolExecutor(4, thread_name_prefix="hotswap-blocking", initializer=serial)


async def off_loop(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    return await asyncio.get_running_loop().run_in_executor(BLOCKING_POOL, functools.partial(fn, *args, **kwargs))
