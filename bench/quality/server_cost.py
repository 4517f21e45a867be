#!/usr/bin/env python3
"""Time per text of each Embed configuration on a running server, one text
per request, alternating configurations, median of each:

    python bench/quality/server_cost.py [--addr 127.0.0.1:50051] [--texts 48] [--reps 3]

The texts are evaluation-part Python standard-library functions (the
quality harness's docstring -> code documents)."""

from __future__ import annotations

import argparse
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
        "MEAN, STANDARDIZE_NONE (the old default)": dict(pooling=pb.POOLING_MEAN, standardize=pb.STANDARDIZE_NONE),
        "MEAN, STANDARDIZE_ZSCORE": dict(pooling=pb.POOLING_MEAN, standardize=pb.STANDARDIZE_ZSCORE),
        "PROBE inline, STANDARDIZE_WHITEN (Embed's default)": dict(),
    }
    for t in texts[:4]:  # warm-up
        stub.Embed(pb.EmbedRequest(texts=[t]))
    times = {k: [] for k in configs}
    for _ in range(args.reps):
        for name, kw in configs.items():
            for t in texts:
                t0 = time.perf_counter()
                stub.Embed(pb.EmbedRequest(texts=[t], **kw))
                times[name].append((time.perf_counter() - t0) * 1000)
    base = statistics.median(times[next(iter(configs))])
    for name, v in times.items():
        m = statistics.median(v)
        print(f"{name}: median {m:.1f} ms per text ({(m / base - 1) * 100:+.1f}% vs the old default), {len(v)} requests")


if __name__ == "__main__":
    main()
