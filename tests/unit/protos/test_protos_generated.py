"""The generated gRPC modules match their .proto sources."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

GENERATE = Path(__file__).parents[3] / "protos" / "generate.py"


def test_generated_modules_are_up_to_date():
    result = subprocess.run(
        [sys.executable, str(GENERATE), "--check"], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, (
        "generated modules are stale; run `python protos/generate.py`:\n" + result.stdout
    )


def test_generated_modules_import_under_the_confide_namespace():
    from confide.protos.v1 import enrollment_pb2, enrollment_pb2_grpc

    request = enrollment_pb2.RegisterRequest(token="t", public_key_openssh=b"k")
    assert enrollment_pb2.RegisterRequest.FromString(request.SerializeToString()) == request
    assert hasattr(enrollment_pb2_grpc, "EnrollmentServicer")


def test_stale_check_detects_an_edited_module(tmp_path, monkeypatch):
    sys.path.insert(0, str(GENERATE.parent))
    try:
        import generate
    finally:
        sys.path.pop(0)
    # Point the generator at a copy whose generated file has been tampered with.
    copy = tmp_path / "protos"
    (copy / "confide" / "v1").mkdir(parents=True)
    source = GENERATE.parent / "confide" / "v1"
    for path in source.iterdir():
        if path.is_file():
            (copy / "confide" / "v1" / path.name).write_bytes(path.read_bytes())
    module = copy / "confide" / "v1" / "enrollment_pb2_grpc.py"
    module.write_text(module.read_text() + "\n# edited by hand\n")
    monkeypatch.setattr(generate, "ROOT", copy)
    monkeypatch.setattr(generate, "PROTOS", sorted((copy / "confide" / "v1").glob("*.proto")))
    monkeypatch.setattr(sys, "argv", ["generate.py", "--check"])
    assert generate.main() == 1
