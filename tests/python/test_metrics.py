"""Prometheus metrics (`--metrics-addr`) scraped during a test and parsed with
prometheus_client's own parser: every counter, gauge and histogram moves by
exactly what the test did (token counts by the tokenizers package, not the
server), and refusals are counted by reason and code."""

from __future__ import annotations

import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path

import grpc
from conftest import DEADLINE, GEN, TINY, Lines, Server, spawn
from prometheus_client.parser import text_string_to_metric_families
from tokenizers import Tokenizer

# The tiny model's KV bytes per token (2 layers x K,V x 2 heads x 16 x f32).
KV_BYTES_PER_TOKEN = 512


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def scrape(addr):
    text = urllib.request.urlopen(f"http://{addr}/metrics", timeout=10).read().decode()
    samples = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            samples[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return samples


def value(samples, name, **labels):
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def wait_scrape(addr, done, what):
    deadline = time.monotonic() + DEADLINE
    while True:
        samples = scrape(addr)
        if done(samples):
            return samples
        assert time.monotonic() < deadline, f"{what}: {samples}"
        time.sleep(0.1)


def user_turn_tokens(text):
    """A user turn's tokens: `<|im_start|>user\\n` (3), the text, `<|im_end|>\\n` (2)."""
    tok = Tokenizer.from_file(str(TINY / "tokenizer.json"))
    return 3 + len(tok.encode(text, add_special_tokens=False).ids) + 2


class Held:
    """A Converse stream that sends its requests one at a time and stays open."""

    def __init__(self, stub, pb2):
        self.pb2, self.queue, self.done = pb2, [], threading.Event()
        self.cond = threading.Condition()
        self.responses = stub.Converse(self._requests(), timeout=DEADLINE)

    def _requests(self):
        while True:
            with self.cond:
                self.cond.wait_for(lambda: self.queue or self.done.is_set())
                if not self.queue:
                    return
                request = self.queue.pop(0)
            yield request

    def send(self, request):
        with self.cond:
            self.queue.append(request)
            self.cond.notify()

    def answer(self):
        return next(self.responses)

    def close(self):
        self.done.set()
        with self.cond:
            self.cond.notify()


# A client process: creates session SID, takes one turn (printing a line
# after each answer), then waits to be killed.
SESSION_CLIENT = r"""
import queue, sys
import grpc
from embedder.v1 import embedder_pb2 as pb, embedder_pb2_grpc as rpc

addr, sid = sys.argv[1], sys.argv[2]
q = queue.Queue()
def requests():
    while True:
        yield q.get()
responses = rpc.EmbedderStub(grpc.insecure_channel(addr)).Converse(requests())
q.put(pb.ConverseRequest(options=pb.SessionOptions(session_mode=pb.SESSION_MODE_CREATE, session_id=sid)))
print(next(responses).ready.session_id, flush=True)
q.put(pb.ConverseRequest(turn=pb.Turn(text="held", role="user")))
print(next(responses).WhichOneof("result"), flush=True)
sys.stdin.read()
"""


def test_metrics_move_as_the_server_works(pb):
    """Turns, tokens, calls, the turn/queue/rows histograms, the open-stream
    and KV gauges and a refusal, each by exactly what the test did."""
    pb2, rpc = pb
    maddr = f"127.0.0.1:{free_port()}"
    server = Server("--metrics-addr", maddr)
    try:
        before = scrape(maddr)
        assert value(before, "se_kv_budget_bytes") > 0
        texts = [f"turn {i}: def f{i}(): pass" for i in range(3)]
        turns = [pb2.ConverseRequest(tag=f"t{i}", turn=pb2.Turn(text=t, role="user")) for i, t in enumerate(texts)]
        bad = pb2.ConverseRequest(tag="bad", turn=pb2.Turn(text="hello", role="robot"))
        with grpc.insecure_channel(server.addr) as ch:
            stub = rpc.EmbedderStub(ch)
            out = list(stub.Converse(iter([*turns, bad]), timeout=DEADLINE))
            assert [r.WhichOneof("result") for r in out] == ["embedding"] * 3 + ["error"]

            # A stream held open shows in the gauges, its cache exactly its
            # context. (A text of its own: had it been the first stream's first
            # turn, it could be answered from that stream's shared prefix if the
            # server had not yet dropped it, without a call.)
            held_text = "held: def g(): pass"
            held = Held(stub, pb2)
            held.send(pb2.ConverseRequest(tag="held", turn=pb2.Turn(text=held_text, role="user")))
            assert held.answer().WhichOneof("result") == "embedding"
            own = user_turn_tokens(held_text) * KV_BYTES_PER_TOKEN
            during = wait_scrape(maddr, lambda s: value(s, "se_open_streams") == 1 and value(s, "se_kv_cache_bytes") == own, "one open stream")
            assert value(during, "se_resident_conversations") == 1
            assert value(during, "se_evicted_conversations") == 0
            held.close()
            list(held.responses)

        want_tokens = sum(user_turn_tokens(t) for t in texts) + user_turn_tokens(held_text)
        after = wait_scrape(maddr, lambda s: value(s, "se_turns_total") == value(before, "se_turns_total") + 4
                            and value(s, "se_open_streams") == 0, "counters moved")
        delta = lambda name, **labels: value(after, name, **labels) - value(before, name, **labels)  # noqa: E731
        assert delta("se_tokens_total") == want_tokens
        assert delta("se_model_calls_total") == 4, "one call per turn, the probe in it"
        assert delta("se_turn_seconds_count") == 5, "4 turns and the refused one"
        assert value(after, "se_turn_seconds_sum") > value(before, "se_turn_seconds_sum")
        assert delta("se_queue_wait_seconds_count") == 5, "every text waited once, the refused one too"
        assert delta("se_batch_rows_count") == 4
        assert delta("se_batch_rows_bucket", le="1") == 4, "each call one row"
        assert value(after, "se_rejected_total", reason="unknown_role", code="InvalidArgument") == 1
        assert value(after, "se_kv_cache_bytes") == 0
        assert value(after, "se_queued_texts") == 0
        # Histograms are cumulative: the +Inf bucket holds every sample.
        assert value(after, "se_turn_seconds_bucket", le="+Inf") == value(after, "se_turn_seconds_count")
    finally:
        server.stop()


def test_memory_and_session_metrics(pb):
    """The queued gauge while a call is held (the `hold` fault), an idle
    eviction and the rebuild after it, and a lost resumable session in the
    detached gauge, each exactly."""
    pb2, rpc = pb
    maddr = f"127.0.0.1:{free_port()}"
    with tempfile.TemporaryDirectory() as gate:
        # Calls: 1 the warm-up, 2 A's first turn, 3 A's second (its context
        # rebuilt in the same call), 4 B's first turn (held).
        server = Server("--metrics-addr", maddr, "--idle-evict-seconds", "0.5",
                        env={"SE_FAULTS": "hold:4", "SE_FAULTS_GATE": gate})
        try:
            with grpc.insecure_channel(server.addr) as ch:
                stub = rpc.EmbedderStub(ch)
                a = Held(stub, pb2)
                first = "def add(a, b): return a + b"
                a.send(pb2.ConverseRequest(turn=pb2.Turn(text=first, role="user")))
                context = a.answer().embedding.context_tokens
                assert context == user_turn_tokens(first)
                # Idle: evicted, token ids kept.
                evicted = wait_scrape(maddr, lambda s: value(s, "se_evictions_total") == 1, "an idle eviction")
                assert value(evicted, "se_evicted_conversations") == 1
                assert value(evicted, "se_resident_conversations") == 0
                assert value(evicted, "se_kv_cache_bytes") == 0
                a.send(pb2.ConverseRequest(turn=pb2.Turn(text="now in Rust", role="user")))
                assert a.answer().embedding.context_tokens == context + user_turn_tokens("now in Rust")
                rebuilt = wait_scrape(maddr, lambda s: value(s, "se_rebuilds_total") == 1, "a rebuild")
                assert value(rebuilt, "se_rebuilt_tokens_total") == context

                # A held call, in a client process holding a resumable
                # session: one text queued (or running) until released.
                child = spawn([sys.executable, "-c", SESSION_CLIENT, server.addr, "metrics-b"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                              env={"PYTHONPATH": str(GEN), "PATH": "/usr/bin:/bin"})
                try:
                    out = Lines(child.stdout)
                    assert out.next().strip() == "metrics-b"
                    wait_scrape(maddr, lambda s: value(s, "se_queued_texts") == 1 and value(s, "se_model_calls_total") == 4,
                                "the held call")
                    (Path(gate) / "4").write_text("")
                    assert out.next().strip() == "embedding"
                    wait_scrape(maddr, lambda s: value(s, "se_queued_texts") == 0, "the held call done")
                    # The client process killed: its stream lost, its session detached.
                    child.send_signal(signal.SIGKILL)
                    child.wait(timeout=DEADLINE)
                finally:
                    child.kill()
                lost = wait_scrape(maddr, lambda s: value(s, "se_detached_sessions") == 1, "a detached session")
                assert value(lost, "se_open_streams") == 1, "A's stream is still open"
                a.close()
                list(a.responses)
        finally:
            server.stop()
