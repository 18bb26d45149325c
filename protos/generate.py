"""Regenerate the Python modules of confide's .proto files (grpcio-tools, from the dev extra).

    python protos/generate.py            # rewrite the generated files
    python protos/generate.py --check    # exit 1 if they are stale (what the test runs)

The generated gRPC module imports its messages as `confide.v1`, the proto package; in this
distribution they live at `confide.protos.v1`, so that one import line is rewritten.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent
PROTOS = sorted((ROOT / "confide" / "v1").glob("*.proto"))
SUFFIXES = ("_pb2.py", "_pb2.pyi", "_pb2_grpc.py")


def generate(out: Path) -> list[Path]:
    from grpc_tools import protoc

    for proto in PROTOS:
        arguments = [
            "grpc_tools.protoc",
            f"-I{ROOT}",
            f"--python_out={out}",
            f"--pyi_out={out}",
            f"--grpc_python_out={out}",
            str(proto.relative_to(ROOT)),
        ]
        if protoc.main(arguments) != 0:
            raise SystemExit(f"protoc failed on {proto}")
    files = []
    for proto in PROTOS:
        for suffix in SUFFIXES:
            path = out / "confide" / "v1" / f"{proto.stem}{suffix}"
            text = path.read_text().replace(
                "from confide.v1 import", "from confide.protos.v1 import"
            )
            path.write_text(text)
            files.append(path)
    return files


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="only report stale files")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        stale = []
        for fresh in generate(Path(scratch)):
            target = ROOT / fresh.relative_to(scratch)
            if not target.exists() or target.read_bytes() != fresh.read_bytes():
                stale.append(target)
                if not args.check:
                    target.write_bytes(fresh.read_bytes())
    for path in stale:
        print(("stale: " if args.check else "written: ") + str(path.relative_to(ROOT.parent)))
    return 1 if (args.check and stale) else 0


if __name__ == "__main__":
    sys.exit(main())
