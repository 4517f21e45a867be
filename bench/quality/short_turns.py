#!/usr/bin/env python3
"""Time per short Converse turn (~15 tokens) on a running server, the
default (PROBE_MEAN through the head) against MEAN pooling of raw states,
the two streams alternating turn by turn, on top of a context of about
`--context-lines` x 18 tokens (0: an empty one). The probe's 12 tokens
weigh most on short turns; bench/quality/server_cost.py has ~113-token ones.

    python bench/quality/short_turns.py [--addr 127.0.0.1:50051] [--context-lines 330] [--turns 12]
"""

from __future__ import annotations

import argparse
import queue
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests/python/gen"))  # the stubs the Python tests generate (or set PYTHONPATH)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--addr", default="127.0.0.1:50051")
    ap.add_argument("--context-lines", type=int, default=330)
    ap.add_argument("--turns", type=int, default=12)
    args = ap.parse_args()
    import grpc
    from embedder.v1 import embedder_pb2 as pb
    from embedder.v1 import embedder_pb2_grpc as rpc

    stub = rpc.EmbedderStub(grpc.insecure_channel(args.addr))
    configs = {
        "MEAN, STANDARDIZE_NONE": dict(pooling=pb.POOLING_MEAN, standardize=pb.STANDARDIZE_NONE),
        "PROBE_MEAN, STANDARDIZE_HEAD (the default)": dict(),
    }
    context = "\n".join(f"def f{i}(x):\n    return x * {i} + {i % 7}" for i in range(args.context_lines))
    streams = {}
    for name, kw in configs.items():
        q = queue.Queue()
        responses = stub.Converse(iter(q.get, None))
        q.put(pb.ConverseRequest(options=pb.SessionOptions(**kw)))
        next(responses)
        if context:
            q.put(pb.ConverseRequest(turn=pb.Turn(text=context, role="user")))
            r = next(responses)
            assert r.WhichOneof("result") == "embedding", r
        streams[name] = (q, responses)
    times = {k: [] for k in configs}
    tokens = 0
    for i in range(args.turns):
        for name, (q, responses) in streams.items():
            t0 = time.perf_counter()
            q.put(pb.ConverseRequest(turn=pb.Turn(text=f"And what does f{i} return for 3?", role="user")))
            r = next(responses)
            assert r.WhichOneof("result") == "embedding", r
            times[name].append((time.perf_counter() - t0) * 1000)
            tokens = r.embedding.context_tokens
    base = statistics.median(next(iter(times.values())))
    for name, v in times.items():
        m = statistics.median(v)
        print(f"{name}: median {m:.1f} ms per short turn ({(m / base - 1) * 100:+.1f}%), context ~{tokens} tokens, {len(v)} turns")
    for q, responses in streams.values():
        q.put(None)
        for _ in responses:
            pass


if __name__ == "__main__":
    main()
