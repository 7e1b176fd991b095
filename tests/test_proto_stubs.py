"""The committed protobuf stubs in proto/v1/ are what scripts/gen_proto.py generates from the
.proto files, and they import as the installed package edgetune.proto.v1."""
from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gen_proto.py"
PROTO_DIR = REPO / "proto" / "v1"

pytestmark = pytest.mark.skipif(not SCRIPT.is_file(), reason="needs the source checkout (scripts/gen_proto.py)")


@pytest.fixture(scope="module")
def gen():
    pytest.importorskip("grpc_tools", reason="the stub check needs grpcio-tools (the test extra)")
    spec = importlib.util.spec_from_file_location("gen_proto", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_stubs_are_up_to_date(gen):
    stale = gen.stale_stubs(PROTO_DIR, PROTO_DIR)
    assert not stale, f"stale stubs {stale}: run `python scripts/gen_proto.py`"


def test_check_reports_a_changed_proto(gen, tmp_path, capsys):
    protos, out = tmp_path / "protos", tmp_path / "out"
    shutil.copytree(PROTO_DIR, protos, ignore=shutil.ignore_patterns("*.py", "*.pyi", "__pycache__"))
    gen.generate(protos, out)
    assert gen.stale_stubs(protos, out) == []
    tensor = protos / "tensor.proto"
    tensor.write_text(tensor.read_text().replace("bytes payload = 8;", "bytes payload = 8;\n  string extra = 9;"))
    # the messages and type hints of tensor.proto change; its (empty) service stub and node/coordinator do not
    assert gen.stale_stubs(protos, out) == ["tensor_pb2.py", "tensor_pb2.pyi"]
    assert gen.main(["--check", "--proto-dir", str(protos), "--out", str(out)]) == 1
    assert "tensor_pb2.py, tensor_pb2.pyi" in capsys.readouterr().err


def test_check_reports_missing_and_orphaned_stubs(gen, tmp_path):
    protos, out = tmp_path / "protos", tmp_path / "out"
    shutil.copytree(PROTO_DIR, protos, ignore=shutil.ignore_patterns("*.py", "*.pyi", "__pycache__"))
    gen.generate(protos, out)
    (out / "node_pb2_grpc.py").unlink()
    (out / "old_pb2.py").write_text("")
    assert gen.stale_stubs(protos, out) == ["node_pb2_grpc.py", "old_pb2.py"]


def test_broken_proto_fails_generation(gen, tmp_path):
    protos = tmp_path / "protos"
    protos.mkdir()
    (protos / "bad.proto").write_text('syntax = "proto3";\nmessage X { nope y = 1; }\n')
    with pytest.raises(gen.GenerationError, match="protoc failed on bad.proto"):
        gen.generate(protos, tmp_path / "out")


def test_check_command_line():
    result = subprocess.run([sys.executable, str(SCRIPT), "--check"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "up to date" in result.stdout


def test_stubs_import_as_the_edgetune_package():
    from edgetune.proto.v1 import coordinator_pb2, coordinator_pb2_grpc, node_pb2, node_pb2_grpc, tensor_pb2

    assert tensor_pb2.DESCRIPTOR.package == "edgetune.v1"
    assert node_pb2.DESCRIPTOR.dependencies[0].name == "edgetune/proto/v1/tensor.proto"
    assert coordinator_pb2.DESCRIPTOR.services_by_name["Coordinator"].methods_by_name["FetchEdgePart"]
    assert hasattr(node_pb2_grpc, "NodeStub") and hasattr(coordinator_pb2_grpc, "CoordinatorServicer")
    for stub in PROTO_DIR.glob("*_pb2*.py*"):
        imports = [line for line in stub.read_text().splitlines() if "_pb2" in line and "import" in line]
        assert all(line.lstrip().startswith("from edgetune.proto.v1 import ") for line in imports), (stub.name, imports)
