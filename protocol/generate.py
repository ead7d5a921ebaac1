"""Regenerate the Python stubs of protocol/ddm.proto: ``python -m protocol.generate``.

The stubs are committed. They come from grpcio-tools at the version pinned in pyproject's
``[test]`` extra, so the same .proto always yields the same files; a test regenerates them
into a temporary folder and fails if they differ from the committed ones.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PROTO = "protocol/ddm.proto"
OUTPUTS = ("protocol/ddm_pb2.py", "protocol/ddm_pb2.pyi", "protocol/ddm_pb2_grpc.py")


def generate(out_dir: Path) -> list[Path]:
    from grpc_tools import protoc

    out_dir.mkdir(parents=True, exist_ok=True)
    args = [
        "grpc_tools.protoc",
        f"--proto_path={ROOT}",
        f"--python_out={out_dir}",
        f"--pyi_out={out_dir}",
        f"--grpc_python_out={out_dir}",
        str(ROOT / PROTO),
    ]
    if protoc.main(args) != 0:
        raise RuntimeError(f"protoc failed on {PROTO}")
    return [out_dir / name for name in OUTPUTS]


def main() -> int:
    for path in generate(ROOT):
        print(path.relative_to(ROOT))
    return 0


if __name__ == "__main__":
    sys.exit(main())
