"""Prometheus metrics (`--metrics-addr`) scraped during a test and parsed with
prometheus_client's own parser: counters, gauges and histograms move as the
server works, and refusals are counted by reason and code."""

from __future__ import annotations

import socket
import time
import urllib.request

import grpc
from conftest import Server
from prometheus_client.parser import text_string_to_metric_families


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
    deadline = time.monotonic() + 20
    while True:
        samples = scrape(addr)
        if done(samples):
            return samples
        assert time.monotonic() < deadline, f"{what}: {samples}"
        time.sleep(0.1)


def test_metrics_move_as_the_server_works(pb):
    pb2, rpc = pb
    maddr = f"127.0.0.1:{free_port()}"
    server = Server("--metrics-addr", maddr)
    try:
        before = scrape(maddr)
        assert value(before, "se_kv_budget_bytes") > 0
        turns = [pb2.ConverseRequest(tag=f"t{i}", turn=pb2.Turn(text=f"turn {i}: def f{i}(): pass", role="user")) for i in range(3)]
        bad = pb2.ConverseRequest(tag="bad", turn=pb2.Turn(text="hello", role="robot"))
        with grpc.insecure_channel(server.addr) as ch:
            stub = rpc.EmbedderStub(ch)
            out = list(stub.Converse(iter([*turns, bad]), timeout=60))
            assert [r.WhichOneof("result") for r in out] == ["embedding"] * 3 + ["error"]

            # A stream held open shows in the gauges.
            held = []
            def one_then_wait():
                yield turns[0]
                while not held:
                    time.sleep(0.01)
            open_stream = stub.Converse(one_then_wait(), timeout=60)
            next(open_stream)
            during = wait_scrape(maddr, lambda s: value(s, "se_open_streams") == 1 and value(s, "se_kv_cache_bytes") > 0, "one open stream")
            held.append(True)
            list(open_stream)

        after = wait_scrape(maddr, lambda s: value(s, "se_turns_total") >= value(before, "se_turns_total") + 4
                            and value(s, "se_open_streams") == 0, "counters moved")
        assert value(after, "se_tokens_total") > value(before, "se_tokens_total")
        assert value(after, "se_model_calls_total") >= value(before, "se_model_calls_total") + 4
        assert value(after, "se_turn_seconds_count") - value(before, "se_turn_seconds_count") == 5, "4 turns and the refused one"
        assert value(after, "se_turn_seconds_sum") > 0
        assert value(after, "se_queue_wait_seconds_count") >= 5
        assert value(after, "se_batch_rows_count") >= 4
        assert value(after, "se_batch_rows_bucket", le="1") >= 4
        assert value(after, "se_rejected_total", reason="unknown_role", code="InvalidArgument") == 1
        assert value(during, "se_resident_conversations") >= 1
        # Histograms are cumulative: the +Inf bucket holds every sample.
        assert value(after, "se_turn_seconds_bucket", le="+Inf") == value(after, "se_turn_seconds_count")
    finally:
        server.stop()
