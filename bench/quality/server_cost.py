#!/usr/bin/env python3
"""Time per text of each Embed configuration, and per turn of each Converse
configuration, on a running server (one text per request; the
configurations alternate text by text), median of each:

    python bench/quality/server_cost.py [--addr 127.0.0.1:50051] [--texts 48] [--reps 3]

The texts are evaluation-part Python standard-library functions (the
quality harness's docstring -> code documents)."""

from __future__ import annotations

import argparse
import queue
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "tests/python/gen"))  # the stubs the Python tests generate (or set PYTHONPATH)

import datasets  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--addr", default="127.0.0.1:50051")
    ap.add_argument("--texts", type=int, default=48)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    import grpc
    from embedder.v1 import embedder_pb2 as pb
    from embedder.v1 import embedder_pb2_grpc as rpc

    texts = [p.doc for p in datasets.sample(datasets.python_pairs(datasets.stdlib_root(), datasets.STDLIB_SKIP), "eval", args.texts)]
    stub = rpc.EmbedderStub(grpc.insecure_channel(args.addr))
    configs = {
        "MEAN, STANDARDIZE_NONE (the first default)": dict(pooling=pb.POOLING_MEAN, standardize=pb.STANDARDIZE_NONE),
        "MEAN, STANDARDIZE_ZSCORE": dict(pooling=pb.POOLING_MEAN, standardize=pb.STANDARDIZE_ZSCORE),
        "PROBE, STANDARDIZE_WHITEN (the previous Embed default)": dict(pooling=pb.POOLING_PROBE),
        "PROBE_MEAN, STANDARDIZE_HEAD (the default)": dict(),
    }
    for t in texts[:4]:  # warm-up
        stub.Embed(pb.EmbedRequest(texts=[t]))

    def report(what, times, unit):
        base = statistics.median(next(iter(times.values())))
        for name, v in times.items():
            m = statistics.median(v)
            print(f"{what} {name}: median {m:.1f} ms per {unit} ({(m / base - 1) * 100:+.1f}% vs the first), {len(v)} samples")

    # Embed: one text per request, the configurations alternating text by text.
    times = {k: [] for k in configs}
    for _ in range(args.reps):
        for t in texts:
            for name, kw in configs.items():
                t0 = time.perf_counter()
                stub.Embed(pb.EmbedRequest(texts=[t], **kw))
                times[name].append((time.perf_counter() - t0) * 1000)
    report("Embed", times, "text")

    # Converse: one stream per configuration taking the texts as user turns
    # (the context grows to a few thousand tokens), the streams alternating
    # turn by turn; a turn's time is from its send to its answer.
    turns = {k: [] for k in configs}
    for _ in range(args.reps):
        streams = {}
        for name, kw in configs.items():
            q = queue.Queue()
            responses = stub.Converse(iter(q.get, None))
            q.put(pb.ConverseRequest(options=pb.SessionOptions(**kw)))
            next(responses)
            streams[name] = (q, responses)
        for t in texts[:16]:
            for name, (q, responses) in streams.items():
                t0 = time.perf_counter()
                q.put(pb.ConverseRequest(turn=pb.Turn(text=t, role="user")))
                r = next(responses)
                assert r.WhichOneof("result") == "embedding", r
                turns[name].append((time.perf_counter() - t0) * 1000)
        for q, responses in streams.values():
            q.put(None)
            for _ in responses:
                pass
    report("Converse", turns, "turn")


if __name__ == "__main__":
    main()
