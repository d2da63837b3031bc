"""Regenerates the Python code for the wire API from the protos.

    python protos/generate.py            # writes clients/python/hotswap/v1/
    python protos/generate.py --out DIR  # writes DIR/hotswap/v1/ (the staleness test)

The generated modules are committed so the client SDK installs without
grpcio-tools; a test fails when they differ from what this script produces.
grpcio-tools is pinned in the dev extra: the stubs record its version.
"""
from __future__ import annotations

import argparse
import sys
from importlib.resources import files
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE.parent / "clients" / "python"


def generate(out_root: Path) -> list[Path]:
    from grpc_tools import protoc

    protos = sorted(HERE.glob("hotswap/v1/*.proto"))
    package = out_root / "hotswap" / "v1"
    package.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"--proto_path={HERE}",
        f"--proto_path={files('grpc_tools') / '_proto'}",  # google/protobuf/*.proto
        f"--python_out={out_root}",
        f"--pyi_out={out_root}",
        f"--grpc_python_out={out_root}",
        *[str(p.relative_to(HERE)) for p in protos],
    ]
    if protoc.main(args) != 0:
        raise SystemExit("protoc failed")
    init = package / "__init__.py"
    init.write_text('"""Generated from protos/hotswap/v1 by protos/generate.py; do not edit."""\n')
    return sorted(p for p in package.iterdir() if p.suffix in (".py", ".pyi"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="root the hotswap/v1 package is written under")
    for path in generate(ap.parse_args().out):
        print(path, file=sys.stderr)


if __name__ == "__main__":
    main()
