"""The wire API: generated code matches the protos, buf lint passes, the SDK stays light."""
from __future__ import annotations

import subprocess
import sys

from tools import ROOT, buf

GENERATED = ROOT / "clients" / "python" / "hotswap" / "v1"


def test_committed_generated_code_is_what_the_protos_produce(tmp_path):
    r = subprocess.run([sys.executable, str(ROOT / "protos" / "generate.py"), "--out", str(tmp_path)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    fresh = {p.name: p.read_text() for p in (tmp_path / "hotswap" / "v1").iterdir() if p.is_file()}
    committed = {p.name: p.read_text() for p in GENERATED.iterdir() if p.is_file()}
    stale = sorted(n for n in fresh.keys() | committed.keys() if fresh.get(n) != committed.get(n))
    assert not stale, f"generated code is stale ({', '.join(stale)}): run `python protos/generate.py` and commit"


def test_buf_lint():
    r = subprocess.run([str(buf()), "lint"], cwd=ROOT / "protos", capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr


def test_the_sdk_imports_without_torch():
    code = "import sys, hotswap.client, hotswap.client.cli; bad = [m for m in ('torch', 'transformers', 'hotswap.server') if m in sys.modules]; print(bad); sys.exit(bool(bad))"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stdout + r.stderr
    deps = (ROOT / "clients" / "python" / "pyproject.toml").read_text()
    assert 'dependencies = ["grpcio>=1.85.1", "protobuf>=7.35.1"]' in deps
