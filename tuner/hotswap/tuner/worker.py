"""`hotswap-tuner`: a training worker. Takes queued jobs from the job store one at
a time and runs them; several workers (processes or machines) can share one store
and never run the same job twice. Reads the same options as hotswap-server
(flags, HOTSWAP_* environment, --config file), so both point at the same stores.
"""
from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading

from hotswap.server.adapters.registry import AdapterRegistry
from hotswap.server.options import ServerOptions, parse_options

from .jobs import JobStore
from .train import run_job

log = logging.getLogger("hotswap.tuner")


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


def serve(opts: ServerOptions, stop: threading.Event, poll_seconds: float = 1.0) -> None:
    store = JobStore(opts.jobs_path)
    registry = AdapterRegistry(opts.registry_path, opts.store_path, opts.adapter_cache_path)
    me = worker_id()
    print(f"hotswap-tuner: worker {me} waiting for jobs", flush=True)
    while not stop.is_set():
        job = store.claim(me, stale_after=opts.tuner_stale_seconds)
        if job is None:
            stop.wait(poll_seconds)
            continue
        log.info("running %s (%s → %s)", job.id, job.method, job.adapter_name)
        run_job(job, store, me, registry, opts.model_config(), opts.max_lora_rank, opts.jobs_dir, stop, opts.data_policy())
        log.info("%s: %s", job.id, store.get(job.id).state)


PARENT_ENV = "HOTSWAP_TUNER_PARENT_PID"


def exit_with_parent() -> None:
    """A worker the server started dies with it, however the server ended (even SIGKILL);
    its job resumes from the last checkpoint when a worker next runs."""
    parent = int(os.environ.get(PARENT_ENV, "0"))
    if not parent:
        return

    def watch() -> None:
        while True:
            if os.getppid() != parent:
                os._exit(0)
            threading.Event().wait(1.0)

    threading.Thread(target=watch, name="hotswap-parent-watch", daemon=True).start()


def main(argv: list[str] | None = None) -> None:
    exit_with_parent()
    opts = parse_options(argv, prog="hotswap-tuner")
    logging.basicConfig(level=opts.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    stop = threading.Event()
    # SIGTERM/SIGINT: the running job saves a checkpoint at the end of its current step
    # and goes back to the queue for the next worker. (Killed outright, a job is requeued
    # once its heartbeat is stale and resumes from its last periodic checkpoint.)
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    serve(opts, stop)
    sys.exit(0)


if __name__ == "__main__":
    main()
