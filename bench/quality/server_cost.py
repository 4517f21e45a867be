#!/usr/bin/env python3
"""Time per text of each Embed configuration, and per turn of each Converse
configuration, on a running server (one text per request; the
configurations alternate text by text), median of each:

    python bench/quality/server_cost.py [--addr 127.0.0.1:50051] [--texts 48] [--reps 3]

The texts are evaluation-part Python standard-library functions (the
quality harness's docstring -> code documents, ~113 tokens).

    python bench/quality/server_cost.py --short-turns [--context-lines 330] [--turns 12]

instead times short Converse turns (~15 tokens), the default against MEAN
pooling of raw states, on top of a context of about `--context-lines` x 18
tokens (0: an empty one): the probe's 12 tokens weigh most on short turns."""

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


def report(what, times, unit, extra=""):
    """Each configuration's median, and how it compares with the first's."""
    base = statistics.median(next(iter(times.values())))
    for name, v in times.items():
        m = statistics.median(v)
        print(f"{what} {name}: median {m:.1f} ms per {unit} ({(m / base - 1) * 100:+.1f}% vs the first){extra}, {len(v)} samples")


class Stream:
    """A Converse stream opened with `options`, taking turns one at a time."""

    def __init__(self, stub, pb, options: dict):
        self.pb, self.q = pb, queue.Queue()
        self.responses = stub.Converse(iter(self.q.get, None))
        self.q.put(pb.ConverseRequest(options=pb.SessionOptions(**options)))
        next(self.responses)

    def turn(self, text: str):
        """Sends a user turn; returns (its embedding, milliseconds from send to answer)."""
        t0 = time.perf_counter()
        self.q.put(self.pb.ConverseRequest(turn=self.pb.Turn(text=text, role="user")))
        r = next(self.responses)
        assert r.WhichOneof("result") == "embedding", r
        return r.embedding, (time.perf_counter() - t0) * 1000

    def close(self):
        self.q.put(None)
        for _ in self.responses:
            pass


def short_turns(stub, pb, context_lines: int, turns: int):
    configs = {
        "MEAN, STANDARDIZE_NONE": dict(pooling=pb.POOLING_MEAN, standardize=pb.STANDARDIZE_NONE),
        "PROBE_MEAN, STANDARDIZE_HEAD (the default)": dict(),
    }
    context = "\n".join(f"def f{i}(x):\n    return x * {i} + {i % 7}" for i in range(context_lines))
    streams = {name: Stream(stub, pb, kw) for name, kw in configs.items()}
    if context:
        for s in streams.values():
            s.turn(context)
    times = {k: [] for k in configs}
    tokens = 0
    for i in range(turns):
        for name, s in streams.items():
            e, ms = s.turn(f"And what does f{i} return for 3?")
            times[name].append(ms)
            tokens = e.context_tokens
    report("Converse short turn", times, "turn", f", context ~{tokens} tokens")
    for s in streams.values():
        s.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--addr", default="127.0.0.1:50051")
    ap.add_argument("--texts", type=int, default=48)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--short-turns", action="store_true", help="time short Converse turns instead")
    ap.add_argument("--context-lines", type=int, default=330)
    ap.add_argument("--turns", type=int, default=12)
    args = ap.parse_args()
    import grpc
    from embedder.v1 import embedder_pb2 as pb
    from embedder.v1 import embedder_pb2_grpc as rpc

    stub = rpc.EmbedderStub(grpc.insecure_channel(args.addr))
    if args.short_turns:
        short_turns(stub, pb, args.context_lines, args.turns)
        return
    texts = [p.doc for p in datasets.sample(datasets.python_pairs(datasets.stdlib_root(), datasets.STDLIB_SKIP), "eval", args.texts)]
    configs = {
        "MEAN, STANDARDIZE_NONE (the first default)": dict(pooling=pb.POOLING_MEAN, standardize=pb.STANDARDIZE_NONE),
        "MEAN, STANDARDIZE_ZSCORE": dict(pooling=pb.POOLING_MEAN, standardize=pb.STANDARDIZE_ZSCORE),
        "PROBE, STANDARDIZE_WHITEN (the previous Embed default)": dict(pooling=pb.POOLING_PROBE),
        "PROBE_MEAN, STANDARDIZE_HEAD (the default)": dict(),
    }
    for t in texts[:4]:  # warm-up
        stub.Embed(pb.EmbedRequest(texts=[t]))

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
        streams = {name: Stream(stub, pb, kw) for name, kw in configs.items()}
        for t in texts[:16]:
            for name, s in streams.items():
                turns[name].append(s.turn(t)[1])
        for s in streams.values():
            s.close()
    report("Converse", turns, "turn")


if __name__ == "__main__":
    main()
