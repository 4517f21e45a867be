"""Shared fixtures for the Python tests: paths, models, a server process,
and gRPC stubs generated from proto/ at test time."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
MODELS = ROOT / "models"
REAL = MODELS / "qwen2.5-coder-0.5b-instruct"
TINY = MODELS / "tiny"
VENV_BIN = Path(sys.executable).parent
BIN = Path(os.environ.get("SE_BIN", ROOT / "target" / "debug" / "stateful-embedder"))
GEN = Path(__file__).resolve().parent / "gen"

# models/ (gguf_source, qwen_onnx) is on sys.path through pytest.ini's pythonpath.


def require(path: Path) -> Path:
    """The path, or a skip with the reason — a failure under `make test` (SE_REQUIRE_MODELS=1)."""
    if path.exists():
        return path
    reason = f"{path} is not prepared (run `make models`)"
    if os.environ.get("SE_REQUIRE_MODELS") == "1":
        pytest.fail(reason)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def pb():
    """The embedder.v1 Python stubs, generated from proto/ with grpc_tools."""
    GEN.mkdir(exist_ok=True)
    subprocess.run(
        [
            sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'proto'}", f"--python_out={GEN}",
            f"--grpc_python_out={GEN}", str(ROOT / "proto/embedder/v1/embedder.proto"),
        ],
        check=True,
    )
    sys.path.insert(0, str(GEN))
    from embedder.v1 import embedder_pb2, embedder_pb2_grpc  # noqa: PLC0415

    return embedder_pb2, embedder_pb2_grpc


class Server:
    """A stateful-embedder process on 127.0.0.1:0 serving the tiny model
    (over TLS when `credentials`, grpcio channel credentials, are given)."""

    def __init__(self, *extra: str, credentials=None):
        self.credentials = credentials
        if not BIN.exists():
            pytest.fail(f"{BIN} is missing: build it first (make test runs cargo test, which builds it)")
        require(TINY / "model.onnx")
        self.proc = subprocess.Popen(
            [str(BIN), "serve", "--addr", "127.0.0.1:0", "--model", str(TINY), *extra],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
        )
        line = self.proc.stdout.readline()
        assert line.startswith("listening on "), f"unexpected first line {line!r}"
        self.addr = line.split()[-1]
        self.wait_serving()

    def wait_serving(self):
        import grpc  # noqa: PLC0415
        from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: PLC0415

        with self.channel() as ch:
            for resp in health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(), timeout=60):
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        raise AssertionError("the server never became SERVING")

    def channel(self):
        import grpc  # noqa: PLC0415

        if self.credentials is None:
            return grpc.insecure_channel(self.addr)
        return grpc.secure_channel(self.addr, self.credentials)

    def stop(self):
        self.proc.kill()
        self.proc.wait()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.stop()
