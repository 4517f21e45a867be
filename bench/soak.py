#!/usr/bin/env python3
"""`make soak`: load and faults for a while, loopback only, on the tiny model.

* 200 streams × 200 turns (`se-bench soak`), 1% of them cancelled mid-turn;
* meanwhile, client processes (`se-bench soak`, 8 streams each) started and
  killed with SIGKILL at random moments, one after another;
* the server's RSS sampled every second: after a warm-up (the first quarter)
  its growth must stay under max(8 MiB, 2%) (the slope is reported);
* at the end every stream is gone: GetStats must show no open stream and no
  KV byte held, and the main load must have no error but its own cancels.

Writes bench/soak.json and prints a summary; exits non-zero on a failure.

    python bench/soak.py [--streams 200] [--turns 200]
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from run import RELEASE, ROOT, Proc, cpu_features, features_text, free_port, log  # noqa: E402

TINY = ROOT / "models/tiny"


def stats(addr):
    import grpc

    sys.path.insert(0, str(ROOT / "tests/python/gen"))
    from embedder.v1 import embedder_pb2, embedder_pb2_grpc

    with grpc.insecure_channel(addr) as ch:
        return embedder_pb2_grpc.EmbedderStub(ch).GetStats(embedder_pb2.GetStatsRequest(), timeout=10)


def slope(samples):
    """Least-squares slope (bytes per second) of (t, rss) samples."""
    n = len(samples)
    mt = sum(t for t, _ in samples) / n
    mr = sum(r for _, r in samples) / n
    var = sum((t - mt) ** 2 for t, _ in samples)
    return sum((t - mt) * (r - mr) for t, r in samples) / var if var else 0.0


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--streams", type=int, default=200)
    ap.add_argument("--turns", type=int, default=200)
    args = ap.parse_args()
    gen = ROOT / "tests/python/gen"
    gen.mkdir(exist_ok=True)
    subprocess.run([sys.executable, "-m", "grpc_tools.protoc", f"-I{ROOT / 'proto'}", f"--python_out={gen}",
                    f"--grpc_python_out={gen}", ROOT / "proto/embedder/v1/embedder.proto"], check=True)

    port = free_port()
    addr = f"127.0.0.1:{port}"
    server = Proc([RELEASE / "stateful-embedder", "serve", "--addr", addr, "--model", TINY, "--max-kv-bytes", "16MiB"], addr)
    samples, done = [], threading.Event()
    t0 = time.monotonic()

    def sample():
        while not done.is_set():
            samples.append((time.monotonic() - t0, server.rss()))
            time.sleep(1.0)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    soak = [str(RELEASE / "se-bench"), "soak", "--addr", f"http://{addr}"]
    main_load = subprocess.Popen([*soak, "--streams", str(args.streams), "--turns", str(args.turns)],
                                 stdout=subprocess.PIPE, text=True, cwd=ROOT)
    kills, rng = 0, random.Random(7)
    failures = []
    try:
        while main_load.poll() is None:
            victim = subprocess.Popen([*soak, "--streams", "8", "--turns", "100000", "--seed", str(kills + 2)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=ROOT)
            time.sleep(rng.uniform(0.5, 2.5))
            victim.send_signal(signal.SIGKILL)
            victim.wait()
            kills += 1
        out = json.loads(main_load.stdout.read().strip().splitlines()[-1])
        if main_load.returncode != 0:
            failures.append(f"the main load exited with {main_load.returncode}")
        # Every client is gone: nothing may be left.
        deadline = time.monotonic() + 30
        while True:
            s = stats(addr)
            if (s.open_streams, s.kv_cache_bytes) == (0, 0) or time.monotonic() > deadline:
                break
            time.sleep(0.1)
        left = {"open_streams": s.open_streams, "kv_cache_bytes": s.kv_cache_bytes, "turns_total": s.turns_total,
                "evictions_total": s.evictions_total, "rebuilds_total": s.rebuilds_total}
    finally:
        done.set()
        sampler.join()
        server.stop()

    warm = samples[len(samples) // 4:]
    rate = slope(warm) if len(warm) >= 3 else 0.0
    window = warm[-1][0] - warm[0][0] if len(warm) >= 2 else 0.0
    grown = rate * window
    mean_rss = sum(r for _, r in warm) / max(len(warm), 1)
    bound = max(8 << 20, 0.02 * mean_rss)
    if out["error_count"]:
        failures.append(f"{out['error_count']} errors that were not injected: {out['errors']}")
    if (left["open_streams"], left["kv_cache_bytes"]) != (0, 0):
        failures.append(f"left behind: {left}")
    if grown > bound:
        failures.append(f"RSS grew {grown / 1e6:.1f} MB after warm-up (bound {bound / 1e6:.1f} MB)")
    R = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu_features": features_text(cpu_features()),
        "load": out, "client_kills": kills, "after": left,
        "rss_samples": len(samples), "rss_first_mb": samples[0][1] / 1e6 if samples else None,
        "rss_last_mb": samples[-1][1] / 1e6 if samples else None,
        "rss_slope_bytes_per_s_after_warmup": rate, "rss_growth_after_warmup_mb": grown / 1e6,
        "failures": failures,
    }
    (ROOT / "bench/soak.json").write_text(json.dumps(R, indent=1))
    log(json.dumps({k: v for k, v in R.items() if k != "load"} | {"turns_ok": out["turns_ok"], "cancels": out["cancels"],
        "p50_ms": out["p50_ms"], "p99_ms": out["p99_ms"], "seconds": out["seconds"]}))
    if failures:
        log("SOAK FAILED: " + "; ".join(failures))
        sys.exit(1)
    log("soak passed")


if __name__ == "__main__":
    main()
