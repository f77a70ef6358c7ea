"""Regenerate the committed Python stubs under chainrule/v1 from proto/chainrule/v1.

The stubs are committed so that `pip install -e .` needs no code generator; the test
suite runs this script into a temporary folder and fails when the committed copy differs.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from grpc_tools import protoc

ROOT = Path(__file__).resolve().parent.parent
PROTO_ROOT = ROOT / "proto"


def proto_files() -> list[str]:
    return sorted(str(p.relative_to(PROTO_ROOT)) for p in (PROTO_ROOT / "chainrule" / "v1").glob("*.proto"))


def service_files() -> list[str]:
    return [name for name in proto_files() if name.endswith("_service.proto")]


def generate(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    include_dir = str(Path(protoc.__file__).parent / "_proto")
    includes = [f"-I{PROTO_ROOT}", f"-I{include_dir}"]
    messages = [f"--python_out={out_dir}", f"--mypy_out=quiet:{out_dir}", *proto_files()]
    services = [f"--grpc_python_out={out_dir}", f"--mypy_grpc_out=quiet:{out_dir}", *service_files()]
    for outputs in (messages, services):
        if protoc.main(["grpc_tools.protoc", *includes, *outputs]) != 0:
            raise SystemExit("protoc failed")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", type=Path, default=ROOT, help="folder that receives chainrule/v1/*_pb2*.py")
    generate(parser.parse_args().out)


if __name__ == "__main__":
    sys.exit(main())
