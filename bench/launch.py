"""A hotswap-server child process for benchmarks: started with the given flags on a
free loopback port, returned once it reports serving."""
from __future__ import annotations

import re
import subprocess
import sys
import threading


def start_server(*flags: str) -> tuple[subprocess.Popen, str]:
    cmd = [sys.executable, "-m", "hotswap.server.api.app", "--host", "127.0.0.1", "--port", "0", *flags]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    port = None
    for line in proc.stdout:
        m = re.search(r"grpc port (\d+)", line)
        if m:
            port = m[1]
        if "hotswap: serving" in line:
            break
    if port is None:
        raise SystemExit("server did not start")
    threading.Thread(target=lambda: [None for _ in proc.stdout], daemon=True).start()  # keep its pipe drained
    return proc, f"127.0.0.1:{port}"
