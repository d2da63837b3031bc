"""External tools the suite drives (buf, promtool, a Node gRPC client), fetched once
into .cache/tools from the package registries: npm for buf and @grpc/grpc-js, the
Debian archive for promtool (unpacked, not installed: no root, no daemon)."""
from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / ".cache" / "tools"
NPM_PACKAGES = ("@bufbuild/buf@1.75.0", "@grpc/grpc-js@1.14.7", "@grpc/proto-loader@0.8.1")


def _run(cmd: list[str], cwd: Path) -> None:
    r = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed (needs the npm/Debian registries):\n{r.stdout}\n{r.stderr}")


def node_modules() -> Path:
    node = TOOLS / "node"
    if not (node / "node_modules" / "@grpc" / "grpc-js").is_dir() or not (node / "node_modules" / ".bin" / "buf").exists():
        node.mkdir(parents=True, exist_ok=True)
        _run(["npm", "install", "--no-audit", "--no-fund", "--prefix", str(node), *NPM_PACKAGES], node)
    return node / "node_modules"


def buf() -> Path:
    return node_modules() / ".bin" / "buf"


def promtool() -> Path:
    found = shutil.which("promtool")
    if found:
        return Path(found)
    deb = TOOLS / "prometheus"
    exe = deb / "root" / "usr" / "bin" / "promtool"
    if not exe.exists():
        deb.mkdir(parents=True, exist_ok=True)
        _run(["apt-get", "download", "prometheus"], deb)
        pkg = next(deb.glob("prometheus_*.deb"))
        _run(["dpkg-deb", "-x", str(pkg), str(deb / "root")], deb)
    return exe
