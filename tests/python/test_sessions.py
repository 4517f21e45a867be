"""Resumable sessions with real client processes (tiny model): a grpcio client
killed with SIGKILL mid-conversation, and grpcurl interrupted, each resumed
by a new stream whose turns equal an unbroken conversation's."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import grpc
import numpy as np
from conftest import DEADLINE, GEN, VENV_BIN, Lines, Server, spawn, wait_stats

TEXTS = [
    "def add(a, b):\n    return a + b",
    "Now the same in Rust, please.",
    "fn add(a: i32, b: i32) -> i32 { a + b }",
    "And what does it return for 2 and 3?",
]

# A client process: creates session SID, takes the first two turns (one JSON
# line each on stdout), sends the third and then waits to be killed.
CHILD = r"""
import json, queue, sys
import grpc
from embedder.v1 import embedder_pb2 as pb, embedder_pb2_grpc as rpc

addr, sid, texts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
q = queue.Queue()
def requests():
    while True:
        yield q.get()
responses = rpc.EmbedderStub(grpc.insecure_channel(addr)).Converse(requests())
q.put(pb.ConverseRequest(tag="options", options=pb.SessionOptions(session_mode=pb.SESSION_MODE_CREATE, session_id=sid)))
print(json.dumps({"session_id": next(responses).ready.session_id}), flush=True)
for i, text in enumerate(texts[:2]):
    q.put(pb.ConverseRequest(tag=f"t{i}", turn=pb.Turn(text=text, role="user")))
    e = next(responses).embedding
    print(json.dumps({"values": list(e.values), "context_tokens": e.context_tokens}), flush=True)
q.put(pb.ConverseRequest(tag="t2", turn=pb.Turn(text=texts[2], role="user")))
print(json.dumps({"sent": "t2"}), flush=True)
sys.stdin.read()
"""


def unbroken(pb, addr):
    """The four turns on one stream: what a resumed session must equal."""
    pb2, rpc = pb
    reqs = [pb2.ConverseRequest(tag=f"t{i}", turn=pb2.Turn(text=t, role="user")) for i, t in enumerate(TEXTS)]
    with grpc.insecure_channel(addr) as ch:
        out = list(rpc.EmbedderStub(ch).Converse(iter(reqs), timeout=60))
    return [np.array(r.embedding.values, dtype=np.float32) for r in out]


def test_session_resumes_after_the_client_is_killed(pb):
    """A grpcio client process is SIGKILLed with a turn in flight; a new stream
    resumes its session: `ready` says how many turns made it in, and the next
    turns equal an unbroken conversation's (≤ 1e-6). A second stream cannot
    take the held id; a half-close ends the session (NOT_FOUND after)."""
    pb2, rpc = pb
    server = Server("--detached-ttl-seconds", "60")
    try:
        want = unbroken(pb, server.addr)
        env = dict(os.environ, PYTHONPATH=str(GEN))
        child = spawn(
            [sys.executable, "-c", CHILD, server.addr, "killed-client-1", json.dumps(TEXTS)],
            stdout=subprocess.PIPE, stdin=subprocess.PIPE, text=True, env=env,
        )
        out = Lines(child.stdout)
        lines = [json.loads(out.next()) for _ in range(4)]
        assert lines[0] == {"session_id": "killed-client-1"}
        for i in (0, 1):
            got = np.array(lines[1 + i]["values"], dtype=np.float32)
            assert float(np.abs(got - want[i]).max()) <= 1e-6
        assert lines[3] == {"sent": "t2"}
        child.send_signal(signal.SIGKILL)
        child.wait(timeout=DEADLINE)

        with grpc.insecure_channel(server.addr) as ch:
            stub = rpc.EmbedderStub(ch)
            wait_stats(stub, pb2, lambda s: s.detached_sessions == 1 and s.open_streams == 0, "detached")

            held = []

            def resumed_requests():
                yield pb2.ConverseRequest(
                    tag="resume", options=pb2.SessionOptions(session_mode=pb2.SESSION_MODE_RESUME, session_id="killed-client-1")
                )
                while not held:
                    time.sleep(0.01)
                for i in range(held[0], len(TEXTS)):
                    yield pb2.ConverseRequest(tag=f"t{i}", turn=pb2.Turn(text=TEXTS[i], role="user"))

            responses = stub.Converse(resumed_requests(), timeout=DEADLINE)
            ready = next(responses).ready
            assert ready.session_id == "killed-client-1"
            # The third turn was in flight when the client died: in, if the model finished it.
            assert ready.turns in (2, 3), ready
            print(f"\nresumed after SIGKILL: {ready.turns} turns, {ready.context_tokens} tokens")

            # While this stream holds it, another cannot take it.
            other = list(stub.Converse(iter([pb2.ConverseRequest(
                options=pb2.SessionOptions(session_mode=pb2.SESSION_MODE_RESUME, session_id="killed-client-1")
            )]), timeout=60))
            assert other[0].error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0]

            held.append(ready.turns)
            rest = [np.array(r.embedding.values, dtype=np.float32) for r in responses]
            assert len(rest) == len(TEXTS) - ready.turns
            worst = max(float(np.abs(a - b).max()) for a, b in zip(rest, want[ready.turns:]))
            print(f"resumed vs unbroken: max abs diff {worst:.1e}")
            assert worst <= 1e-6
            # The request iterator ended: a half-close, which ends the session for good.
            wait_stats(stub, pb2, lambda s: s.detached_sessions == 0 and s.kv_cache_bytes == 0, "freed")
            gone = list(stub.Converse(iter([pb2.ConverseRequest(
                options=pb2.SessionOptions(session_mode=pb2.SESSION_MODE_RESUME, session_id="killed-client-1")
            )]), timeout=60))
            assert gone[0].error.code == grpc.StatusCode.NOT_FOUND.value[0]
    finally:
        server.stop()


def grpcurl_cmd(addr, *extra):
    return [str(Path(VENV_BIN) / "grpcurl"), "-plaintext", *extra, addr, "embedder.v1.Embedder/Converse"]


def test_grpcurl_session_resumes(pb, server):
    """The README's grpcurl example: a session created from stdin, grpcurl
    interrupted (SIGINT, as Ctrl-C would) while the stream is open, then
    resumed with -d. grpcurl starts with SIGINT's default disposition
    whatever the suite's (conftest.spawn), so the interrupt works however
    the suite was launched."""
    pb2, _ = pb
    first = spawn(grpcurl_cmd(server.addr, "-d", "@"), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    first.stdin.write('{"options": {"session_mode": "SESSION_MODE_CREATE", "session_id": "chat-42"}}\n')
    first.stdin.write('{"turn": {"text": "def add(a, b): return a + b", "role": "user"}}\n')
    first.stdin.flush()
    out, seen = Lines(first.stdout), ""
    while '"embedding"' not in seen or not seen.rstrip().endswith("}"):
        seen += out.next()
    first.send_signal(signal.SIGINT)
    first.wait(timeout=DEADLINE)
    # The server sees the stream lost (not half-closed): the session is kept.
    server.stats(pb, lambda s: s.detached_sessions == 1 and s.open_streams == 0, "detached")

    resume = json.dumps({"options": {"session_mode": "SESSION_MODE_RESUME", "session_id": "chat-42"}})
    turn = json.dumps({"turn": {"text": "now in Rust", "role": "user"}})
    out = subprocess.run(
        grpcurl_cmd(server.addr, "-d", f"{resume} {turn}"), capture_output=True, text=True, timeout=DEADLINE,
        stdin=subprocess.DEVNULL,
    )
    assert out.returncode == 0, out.stderr
    dec, text, responses = json.JSONDecoder(), out.stdout, []
    while text.strip():
        obj, end = dec.raw_decode(text.lstrip())
        responses.append(obj)
        text = text.lstrip()[end:]
    assert responses[0]["ready"]["sessionId"] == "chat-42", responses
    assert responses[0]["ready"]["turns"] == "1"
    first_tokens = int(responses[0]["ready"]["contextTokens"])
    assert int(responses[1]["embedding"]["contextTokens"]) > first_tokens > 0
