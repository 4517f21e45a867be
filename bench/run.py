#!/usr/bin/env python3
"""`make bench`: every comparison of BENCHMARKS.md in one run on this machine,
contenders alternated, each after a warm-up, N repetitions, medians with
min–max. Writes BENCHMARKS.md (and bench/results.json with the raw figures).

    python bench/run.py [--reps N] [--out BENCHMARKS.md]
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
REAL = ROOT / "models/qwen2.5-coder-0.5b-instruct"
RELEASE = ROOT / "target/release"
PY = sys.executable
GFLOP_PER_TOKEN = 0.72  # Qwen2.5-0.5B without the lm_head: 0.36 G non-embedding params × 2
VARIANTS = ["model.onnx", "model_fp16.onnx", "model_int8.onnx", "model_q4.onnx", "model_q8.onnx"]


def log(msg):
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def run_json(cmd, env=None, timeout=3600):
    log(" ".join(str(c) for c in cmd))
    out = subprocess.run([str(c) for c in cmd], capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT)
    if out.returncode != 0:
        raise RuntimeError(f"{cmd[0]} failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_of(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def wait_serving(addr, timeout=120):
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with grpc.insecure_channel(addr) as ch:
                r = health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), timeout=2)
                if r.status == health_pb2.HealthCheckResponse.SERVING:
                    return
        except grpc.RpcError:
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{addr} never became SERVING")


class Proc:
    def __init__(self, cmd, addr, env=None):
        self.t0 = time.monotonic()
        self.p = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env, cwd=ROOT)
        wait_serving(addr)
        self.startup_s = time.monotonic() - self.t0
        self.addr = addr

    def rss(self):
        return rss_of(self.p.pid)

    def stop(self):
        self.p.terminate()
        try:
            self.p.wait(15)
        except subprocess.TimeoutExpired:
            self.p.kill()


def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return xs[n // 2] if n % 2 else (xs[n // 2 - 1] + xs[n // 2]) / 2


def mm(xs, fmt="{:.0f}"):
    return f"{fmt.format(median(xs))} ({fmt.format(min(xs))}–{fmt.format(max(xs))})"


def st(s):
    """A stats object from se-bench as "median (min–max)" in ms."""
    return f"{s['median_ms']:.0f} ({s['min_ms']:.0f}–{s['max_ms']:.0f})"


def gemm():
    code = r"""
import json, time, numpy as np
def gf(m, k, n, reps):
    a = np.random.rand(m, k).astype(np.float32); b = np.random.rand(k, n).astype(np.float32)
    a @ b
    best = []
    for _ in range(reps):
        t = time.perf_counter(); a @ b; best.append(time.perf_counter() - t)
    best.sort()
    return 2 * m * k * n / best[len(best) // 2] / 1e9
try:
    from threadpoolctl import threadpool_info
    info = [(i.get("internal_api"), i.get("architecture"), i.get("num_threads")) for i in threadpool_info()]
except Exception:
    info = []
print(json.dumps({"turn_shapes": {"45x896x4864": gf(45, 896, 4864, 200), "45x4864x896": gf(45, 4864, 896, 200), "45x896x1152": gf(45, 896, 1152, 300)},
                  "large_2048": gf(2048, 2048, 2048, 5), "blas": info}))
"""
    env = {k: v for k, v in os.environ.items() if k not in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")}
    env["OPENBLAS_NUM_THREADS"] = "2"
    return run_json([PY, "-c", code], env=env)


# The CPU flags ONNX Runtime's kernels depend on (and so every speed figure,
# and the quantised variants' numbers): /proc/cpuinfo spelling.
KERNEL_FLAGS = ["avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8", "amx_bf16", "avx512_bf16", "avx512_fp16"]


def cpu_features():
    flags = next((l.split(":", 1)[1].split() for l in open("/proc/cpuinfo") if l.startswith("flags")), [])
    return {f: f in flags for f in KERNEL_FLAGS}


def features_text(features):
    if not features:
        return "CPU features not recorded by this run"
    have = [f for f, on in features.items() if on]
    lack = [f for f, on in features.items() if not on]
    return f"CPU features {' '.join(have) or 'none'}" + (f" (no {', '.join(lack)})" if lack else "")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=6, help="alternations of the server contenders (and of comparison 3)")
    ap.add_argument("--out", default=str(ROOT / "BENCHMARKS.md"))
    ap.add_argument("--resume", action="store_true", help="reuse the stages bench/partial.json already holds")
    ap.add_argument("--report-only", action="store_true", help="rewrite the report from bench/results.json, measuring nothing")
    args = ap.parse_args()
    if args.report_only:
        R = json.loads((ROOT / "bench/results.json").read_text())
        R["servers"] = {name: {int(k): v for k, v in by.items()} for name, by in R["servers"].items()}
        Path(args.out).write_text(report(R, args))
        log(f"wrote {args.out}")
        return
    partial = ROOT / "bench/partial.json"
    saved = json.loads(partial.read_text()) if args.resume and partial.exists() else {}

    def stage(key, fn):
        if key in saved:
            log(f"reusing {key} from {partial}")
            R[key] = saved[key]
            R.setdefault("reused", []).append(f"{key} (measured {saved.get('date', '?')})")
        else:
            R[key] = fn()
            saved[key] = R[key]
            partial.write_text(json.dumps(saved, default=str))
        return R[key]

    R = {"date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")}
    saved.setdefault("date", R["date"])
    R["machine"] = {
        "cpu": next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?"),
        "cpu_features": cpu_features(),
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "commit": subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip(),
    }
    import onnxruntime

    R["machine"]["onnxruntime"] = onnxruntime.__version__

    # 6. The hardware: GEMM throughput at the turn's shapes.
    stage("gemm", gemm)

    # 1, 2, 7 (in process) on f32.
    stage("engine", lambda: run_json([RELEASE / "se-bench", "engine", "--model", REAL / "model.onnx", "--reps", args.reps]))

    # 4. Variants: speed and fidelity to f32, and the llama.cpp peer, alternated.
    def peers():
        out = {"variants": {v: [] for v in VARIANTS}, "llama": [], "llama_failed": None}
        gguf = subprocess.run([PY, ROOT / "models/prepare.py", "gguf-path"], capture_output=True, text=True).stdout.strip()
        try:
            import llama_cpp  # noqa: F401

            have_llama = True
        except ImportError:
            have_llama = False
            log("llama-cpp-python is not installed: the peer comparison is skipped (bench/requirements.txt)")
        for _ in range(2):
            for v in VARIANTS:
                if (REAL / v).exists():
                    out["variants"][v].append(run_json([
                        RELEASE / "se-bench", "engine", "--quick", "--model", REAL / v, "--reference", REAL / "model.onnx", "--reps", 3
                    ]))
            if have_llama and not out["llama_failed"]:
                peer = subprocess.run([PY, ROOT / "bench/llama_peer.py", gguf, REAL / "tokenizer.json", "3"], capture_output=True, text=True, cwd=ROOT)
                if peer.returncode == 0:
                    out["llama"].append(json.loads(peer.stdout.strip().splitlines()[-1]))
                else:
                    # The peer's own build can fail on a CPU (llama.cpp compiles with -march=native); say so, go on.
                    why = f"exit status {peer.returncode}" if peer.returncode > 0 else f"killed by signal {-peer.returncode}"
                    out["llama_failed"] = f"llama-cpp-python failed on this machine ({why}): {peer.stderr.strip()[-300:] or 'no message'}"
                    log(out["llama_failed"])
        return out

    got = stage("peers", peers)
    R["variants"], R["llama"], R["llama_failed"] = got["variants"], got["llama"], got.get("llama_failed")

    # 3, 5, 7 over gRPC: our server vs the Python server, alternated.
    gen = ROOT / "tests/python/gen"
    subprocess.run([PY, "-m", "grpc_tools.protoc", f"-I{ROOT / 'proto'}", f"--python_out={gen}", f"--grpc_python_out={gen}",
                    ROOT / "proto/embedder/v1/embedder.proto"], check=True)
    load = RELEASE / "se-bench"
    R["servers"] = {"ours": {1: [], 8: []}, "python": {1: [], 8: []}}
    R["servers_short"] = {"ours": [], "python": []}
    R["inproc"] = []
    port = free_port()
    ours = Proc([RELEASE / "stateful-embedder", "serve", "--addr", f"127.0.0.1:{port}", "--model", REAL], f"127.0.0.1:{port}")
    R["server_startup_s"] = ours.startup_s
    R["server_rss_loaded"] = ours.rss()
    R["model_file_bytes"] = sum(f.stat().st_size for f in REAL.glob("model.onnx*"))
    pport = free_port()
    python = Proc([PY, ROOT / "bench/python_server.py", REAL, pport, gen], f"127.0.0.1:{pport}")
    try:
        for _ in range(args.rounds):
            # 3: the same 10 turns in process, between the wire runs (the servers idle).
            R["inproc"].append(run_json([RELEASE / "se-bench", "engine", "--quick", "--reps", 1, "--model", REAL / "model.onnx"]))
            for streams in (1, 8):
                for name, srv in (("ours", ours), ("python", python)):
                    R["servers"][name][streams].append(
                        run_json([load, "load", "--addr", f"http://{srv.addr}", "--streams", streams, "--turns", 10])
                    )
            # Beyond the target: short chat turns from 8 streams, where sharing a call pays most.
            for name, srv in (("ours", ours), ("python", python)):
                R["servers_short"][name].append(
                    run_json([load, "load", "--addr", f"http://{srv.addr}", "--streams", 8, "--turns", 10, "--text", SHORT_TURN])
                )
        rss_before = ours.rss()
        R["churn"] = run_json([
            load, "load", "--addr", f"http://{ours.addr}", "--streams", 8, "--turns", 2, "--rounds", 125, "--text", "a short turn: hello",
        ])
        R["server_rss_before_churn"] = rss_before
        R["server_rss_after_churn"] = ours.rss()
        # Beyond the targets: a short turn while another stream's long turn prefills.
        R["mixed"] = run_json([load, "mixed", "--addr", f"http://{ours.addr}", "--reps", 3, "--text", SHORT_TURN])
    finally:
        ours.stop()
        python.stop()

    (ROOT / "bench/results.json").write_text(json.dumps(R, indent=1, default=str))
    Path(args.out).write_text(report(R, args))
    log(f"wrote {args.out}")


SHORT_TURN = "Yes, and add unit tests too."


def met(ok):
    return "**met**" if ok else "**not met**"


def report(R, args):
    e = R["engine"]
    m = R["machine"]
    L = []
    w = L.append
    w("# Benchmarks\n")
    w(f"Measured {R['date']} on {m['cpu']}, {m['cores']} cores, ONNX Runtime {m['onnxruntime']} (PyPI wheel), commit {m['commit']}.")
    w(f"{features_text(m.get('cpu_features'))}. ONNX Runtime picks its kernels by these, so every figure below, and")
    w("above all the quantised variants' speed, holds for this kind of CPU only: without VNNI (e.g. an AVX2-only AMD EPYC")
    w("Zen 3) q8 is slower than f32 (see the README's variant advice).")
    w("Rerun everything with `make bench` (about 20 minutes; needs `make serve`'s model and bench/requirements.txt, which `make bench` installs);")
    w("it rewrites this file and `bench/results.json`. Times are medians with (min–max); the machine is shared, so single")
    w("runs can be noisy by ±20%: the ratios within one run are what the targets are about.\n")
    if R.get("reused"):
        w(f"Stages reused from an earlier run of `bench/run.py --resume`: {', '.join(R['reused'])}.\n")
    for note in R.get("notes", []):
        w(note + "\n")
    w("Everything above the \"Analysis\" section is generated from this run's measurements only; the analysis (what was")
    w("tried, profiles, earlier runs) is written by hand, dated, and carried over unchanged by each run.\n")
    w(f"Turns are the ~{e['turn_tokens']}-token texts of `bench/turns.txt` (the prototype's 45-token turn), raw text, MEAN pooling, 2 threads "
      "(over gRPC too: the `load` and `mixed` streams ask for `POOLING_MEAN`, `STANDARDIZE_NONE`, the Python server's work; "
      "the server's default adds the probe's tokens to each turn's call, QUALITY.md).\n")
    w("![Turn latency against conversation length: ours on the KV cache against re-embedding the whole conversation; "
      "one turn on a long context](bench/headline.png)\n")
    w("The headline in a picture (`bench/plot.py`, which `make bench` runs after `se-bench profile`): left, comparison 2 "
      "below; right, `bench/profile.json` (the analysis's profile).\n")
    w("![A new stream behind a system prompt shared by 1,000 streams: time to its first vector and the KV held, with and "
      "without shared prefixes](bench/shared.png)\n")
    w("Shared prefixes in a picture (`bench/plot.py` from `se-bench shared`'s `bench/shared.json`; the analysis's "
      "\"Shared prefixes\" entry).\n")

    w("## Targets\n")
    w("| # | comparison | target | measured | |")
    w("|---|---|---|---|---|")
    p = e["prototype"]
    r1 = p["token_by_token"]["median_ms"] / p["one_call"]["median_ms"]
    w(f"| 1 | one call vs token by token, {e['turn_tokens']} tokens | ≥ 10× faster | {r1:.1f}× ({p['one_call']['median_ms']:.0f} ms vs {p['token_by_token']['median_ms']:.0f} ms) | {met(r1 >= 10)} |")
    c10 = e["stateless_vs_stateful"][9]
    r2 = c10["stateless"]["median_ms"] / c10["stateful"]["median_ms"]
    w(f"| 2 | stateful vs stateless at turn 10 | ≥ 5× faster | {r2:.1f}× ({c10['stateful']['median_ms']:.0f} ms vs {c10['stateless']['median_ms']:.0f} ms) | {met(r2 >= 5)} |")
    wire = median([x["median_ms"] for x in R["servers"]["ours"][1]])
    inproc = median([x["turns_1_to_10"]["median_ms"] for x in R["inproc"]])
    r3 = (wire - inproc) / inproc * 100
    w(f"| 3 | gRPC turn (Rust client, loopback) vs in-process, interleaved | overhead ≤ 5% | {r3:+.1f}% ({wire:.1f} ms vs {inproc:.1f} ms, medians of {len(R['inproc'])} alternations) | {met(r3 <= 5)} |")
    if R["llama"]:
        llama = median([x["turns_1_to_10"]["median_ms"] for x in R["llama"]])
        best = None
        for v, runs in R["variants"].items():
            if runs and min(r["fidelity_min_cosine_mean"] for r in runs) >= 0.999:
                t = median([r["turns_1_to_10"]["median_ms"] for r in runs])
                if best is None or t < best[1]:
                    best = (v, t)
        r4 = best[1] / llama if best else float("inf")
        dflt = ""
        if best and all("turns_1_to_10_default" in r for r in R["variants"][best[0]]):
            d = median([r["turns_1_to_10_default"]["median_ms"] for r in R["variants"][best[0]]])
            dflt = f"; with the default vector {d / llama:.2f}× ({d:.0f} ms)"
        w(f"| 4 | fastest variant with cosine ≥ 0.999 of f32 vs llama.cpp (same GGUF) per turn, raw MEAN | ≤ 1.0× (stretch 0.75×) | {r4:.2f}× ({best[0] if best else '-'} {best[1] if best else 0:.0f} ms vs llama.cpp {llama:.0f} ms){dflt} | {met(r4 <= 1.0)} |")
    else:
        why = R.get("llama_failed") or "llama-cpp-python missing"
        w(f"| 4 | vs llama.cpp | ≤ 1.0× | not measured: {why} | **not met** |")
    for streams in (1, 8):
        ours = median([x["tokens_per_s"] for x in R["servers"]["ours"][streams]])
        py = median([x["tokens_per_s"] for x in R["servers"]["python"][streams]])
        w(f"| 5 | throughput vs a Python grpcio+onnxruntime server, {streams} stream(s) × 10 turns of ~{e['turn_tokens']} tokens | ≥ 1.3× | {ours / py:.2f}× ({ours:.0f} vs {py:.0f} tokens/s) | {met(ours / py >= 1.3)} |")
    if R.get("servers_short", {}).get("ours"):
        ours = median([x["tokens_per_s"] for x in R["servers_short"]["ours"]])
        py = median([x["tokens_per_s"] for x in R["servers_short"]["python"]])
        n = R["servers_short"]["ours"][0]["tokens"] // R["servers_short"]["ours"][0]["turns"]
        w(f"| 5+ | the same, 8 streams × 10 short turns of {n} tokens (beyond the target) | – | {ours / py:.2f}× ({ours:.0f} vs {py:.0f} tokens/s) | – |")
    tps = e["turn_tokens"] / (e["turn45"]["empty_context"]["median_ms"] / 1e3)
    gemm_turn = R["gemm"]["turn_shapes"]["45x896x4864"]
    eff = tps * GFLOP_PER_TOKEN
    w(f"| 6 | f32 tokens/s × 0.72 GFLOP vs GEMM GFLOPS at the turn's shapes | ≥ 50% | {eff / gemm_turn * 100:.0f}% ({tps:.0f} tokens/s = {eff:.0f} GFLOPS vs {gemm_turn:.0f}) | {met(eff / gemm_turn >= 0.5)} |")
    mem = e["memory"]
    rss_model = R["server_rss_loaded"]
    limit = 1.1 * R["model_file_bytes"] + 150e6
    w(f"| 7a | server RSS after load vs model file | ≤ 1.1× + 150 MB ({limit / 1e6:.0f} MB) | {rss_model / 1e6:.0f} MB (file {R['model_file_bytes'] / 1e6:.0f} MB) | {met(rss_model <= limit)} |")
    growth = (mem["rss_with_live"] - mem["rss_before_live"]) / mem["kv_bytes_live"]
    w(f"| 7b | RSS growth per live conversation vs its KV bytes | ≤ 1.2× | {growth:.2f}× ({mem['live_conversations']} conversations of 1,000 tokens) | {met(growth <= 1.2)} |")
    churn = (R["server_rss_after_churn"] - R["server_rss_before_churn"]) / R["server_rss_before_churn"] * 100
    w(f"| 7c | server RSS after 1,000 conversations opened, used, closed | within 5% | {churn:+.1f}% ({R['server_rss_before_churn'] / 1e6:.0f} → {R['server_rss_after_churn'] / 1e6:.0f} MB) | {met(abs(churn) <= 5)} |")
    w(f"| 7d | start-up to SERVING, f32 | ≤ 5 s | {R['server_startup_s']:.1f} s | {met(R['server_startup_s'] <= 5)} |")

    w("\n## Targets not met\n")
    one, tbt = p["one_call"]["median_ms"], p["token_by_token"]["median_ms"]
    if r1 < 10:
        w(f"**1. One call vs token by token: {r1:.1f}×, {(1 - r1 / 10) * 100:.0f}% short of 10×.** The one call would have to take {tbt / 10:.0f} ms")
        w(f"instead of {one:.0f}; one token per call took ~{tbt / e['turn_tokens']:.0f} ms a call. See the analysis below.\n")
    if r3 > 5:
        w(f"**3. gRPC vs in-process: {r3:+.1f}% (target ≤ 5%).** {wire:.1f} ms over the wire vs {inproc:.1f} ms in process,")
        w(f"medians of {len(R['inproc'])} interleaved alternations. See the analysis below.\n")
    if not R["llama"]:
        w(f"**4. The fastest faithful variant vs llama.cpp: not measured.** {R.get('llama_failed') or 'llama-cpp-python is not installed'}.\n")
    s1 = [median([x["tokens_per_s"] for x in R["servers"][n][1]]) for n in ("ours", "python")]
    s8 = [median([x["tokens_per_s"] for x in R["servers"][n][8]]) for n in ("ours", "python")]
    if s1[0] / s1[1] < 1.3 or s8[0] / s8[1] < 1.3:
        w(f"**5. Throughput vs the Python server on ~{e['turn_tokens']}-token turns: {s1[0] / s1[1]:.2f}× at 1 stream, {s8[0] / s8[1]:.2f}× at 8 (target 1.3×).**")
        b = e.get("batching")
        if b:
            t45 = b["turn45"]
            w(f"In process, batching 8 × ~{e['turn_tokens']}-token turns made them {t45['one_by_one']['median_ms'] / t45['batched']['median_ms']:.2f}× faster (section 3 and 5).")
        if R.get("servers_short", {}).get("ours"):
            o = median([x["tokens_per_s"] for x in R["servers_short"]["ours"]])
            py = median([x["tokens_per_s"] for x in R["servers_short"]["python"]])
            w(f"With short turns our server did {o / py:.2f}× the Python server's throughput at 8 streams (row 5+).")
        w("See the analysis below.\n")

    w("\n## 1. The prototype's way vs one call\n")
    w(f"{e['turn_tokens']} tokens, empty cache: one call {st(p['one_call'])} ms; token by token {st(p['token_by_token'])} ms.")
    t = e["turn45"]
    w(f"A {e['turn_tokens']}-token turn with an empty context: {st(t['empty_context'])} ms; after {t['context']} tokens of context: {st(t['after_context'])} ms.")
    if "turn45_long_context" in e:
        lc = e["turn45_long_context"]
        w(f"After {lc['context']} tokens of context: {st(lc['turn'])} ms.")

    w("\n## 2. Stateless vs stateful, turns 1…20\n")
    w("| turn | context after | stateful ms | stateless ms | ratio |")
    w("|---|---|---|---|---|")
    for k, row in enumerate(e["stateless_vs_stateful"]):
        w(f"| {row['turn']} | ~{(k + 1) * e['turn_tokens']} | {row['stateful']['median_ms']:.0f} | {row['stateless']['median_ms']:.0f} | {row['stateless']['median_ms'] / row['stateful']['median_ms']:.1f}× |")

    w("\n## 3 and 5. Over gRPC: our server vs a Python server on the same model file\n")
    w("The load generator is `se-bench load` (Rust, tonic): N concurrent streams × 10 turns, each turn sent when the previous")
    w(f"answer arrived; {len(R['inproc'])} alternations of the contenders. The Python server is `bench/python_server.py`.")
    w("Model calls per turn come from our server's GetStats (the Python server runs one call per turn).\n")
    w("| server | streams | turn | tokens/s | p50 ms | p90 ms | p99 ms | model calls / turns |")
    w("|---|---|---|---|---|---|---|---|")

    def calls(xs):
        got = [x["server_calls"] for x in xs if x.get("server_calls")]
        if not got:
            return "1 per turn"
        return f"{sum(c['model_calls'] for c in got)} / {sum(c['turns'] for c in got)}"

    for name in ("ours", "python"):
        rows = [(streams, f"~{e['turn_tokens']} tokens", R["servers"][name][streams]) for streams in (1, 8)]
        if R.get("servers_short", {}).get(name):
            rows.append((8, f"\"{SHORT_TURN}\"", R["servers_short"][name]))
        for streams, turn, xs in rows:
            w(f"| {name} | {streams} | {turn} | {mm([x['tokens_per_s'] for x in xs])} | {median([x['p50_ms'] for x in xs]):.0f} | {median([x['p90_ms'] for x in xs]):.0f} | {median([x['p99_ms'] for x in xs]):.0f} | {calls(xs)} |")
    if "batching" in e:
        b = e["batching"]
        w(f"\nIn process, {b['conversations']} conversations with {b['context'][0]}–{b['context'][1]} tokens of context, one turn each, run one by one vs batched")
        w("into shared calls by `run_turns` (the engine's path when turns queue up), alternating which goes first:\n")
        w("| turn | one by one ms | batched ms | speed-up |")
        w("|---|---|---|---|")
        for label in ("turn45", "short"):
            x = b[label]
            w(f"| {x['turn_tokens']} tokens × {b['conversations']} | {st(x['one_by_one'])} | {st(x['batched'])} | {x['one_by_one']['median_ms'] / x['batched']['median_ms']:.2f}× |")

    if R.get("mixed"):
        x = R["mixed"]
        w(f"\n## Long turns and the other streams (beyond the targets)\n")
        w(f"`se-bench mixed`: a short turn (\"{SHORT_TURN}\") on a fresh stream, alone, and sent {x['delay_ms']} ms after another")
        w(f"stream sent a {x['long_tokens']:,}-token turn (prefilled in 512-token chunks, one per engine round); {len(x['long_ms'])} repetitions.\n")
        w("| | ms |")
        w("|---|---|")
        w(f"| short turn alone | {mm(x['short_alone_ms'])} |")
        w(f"| short turn while the long turn prefills | {mm(x['short_behind_long_ms'])} |")
        w(f"| the long turn | {mm(x['long_ms'])} |")

    w("\n## 4. Variants and the peer\n")
    w("Per-turn time over turns 1–10 of a conversation (in process) with MEAN pooling (z-scored) and with the model's")
    w("default vector (its probe's tokens ride in each turn's call and are cut from the cache), alternated; and the worst")
    w("cosine of each turn's embedding to f32's. The peer prefills the same turns and pools nothing, so MEAN (a sum over")
    w("rows the call makes anyway) is the like for like, the default vector our product's real cost.")
    w("llama.cpp runs the same conversation's turns on top of its own KV cache (`bench/llama_peer.py`), built from")
    w("source on this machine by `make bench` with the CPU's features and AMX off (`bench/llama_flags.py`).\n")
    w("| contender | per turn ms, MEAN | per turn ms, default vector | min cosine MEAN | min cosine LAST_TOKEN | load ms | RSS after load MB |")
    w("|---|---|---|---|---|---|---|")
    for v, runs in R["variants"].items():
        if runs:
            dflt = mm([r["turns_1_to_10_default"]["median_ms"] for r in runs]) if all("turns_1_to_10_default" in r for r in runs) else "–"
            w(f"| ours {v} | {mm([r['turns_1_to_10']['median_ms'] for r in runs])} | {dflt} | {min(r['fidelity_min_cosine_mean'] for r in runs):.5f} | {min(r['fidelity_min_cosine_last_token'] for r in runs):.5f} | {median([r['load_ms'] for r in runs]):.0f} | {median([r['rss_loaded'] for r in runs]) / 1e6:.0f} |")
    if R["llama"]:
        w(f"| llama.cpp (llama-cpp-python, Q4_K_M GGUF) | {mm([x['turns_1_to_10']['median_ms'] for x in R['llama']])} | – | – | – | – | – |")
        w(f"\nllama.cpp one token at a time, {e['turn_tokens']} tokens: {median([x['token_by_token_45']['median_ms'] for x in R['llama']]):.0f} ms.")

    w("\n## 6. The hardware\n")
    g = R["gemm"]
    w(f"numpy f32 GEMM, 2 threads: " + ", ".join(f"{k}: {v:.0f} GFLOPS" for k, v in g["turn_shapes"].items()) + f"; 2048³: {g['large_2048']:.0f} GFLOPS. BLAS: {g['blas']}.")

    bt = e.get("batching", {})
    if bt or R.get("mixed"):
        w("\n## Fast paths measured in this run\n")
        w("| fast path | effect in this run |")
        w("|---|---|")
        if bt:
            t45, sh = bt["turn45"], bt["short"]
            w(f"| batching queued turns of different streams into one padded call (`--max-batch-turns`) | in process, 8 × {t45['turn_tokens']}-token turns {t45['one_by_one']['median_ms'] / t45['batched']['median_ms']:.2f}× faster, 8 × {sh['turn_tokens']}-token turns {sh['one_by_one']['median_ms'] / sh['batched']['median_ms']:.2f}× |")
        if R.get("mixed"):
            w(f"| long turns take one chunk per engine round | a short turn sent during a {R['mixed']['long_tokens']:,}-token prefill is answered in {median(R['mixed']['short_behind_long_ms']):,.0f} ms; the long turn takes {median(R['mixed']['long_ms']):,.0f} ms |")

    w("\n## 7. Memory\n")
    w(f"In process: RSS {mem['rss_before_live'] / 1e6:.0f} MB → {mem['rss_with_live'] / 1e6:.0f} MB with {mem['live_conversations']} live 1,000-token conversations holding {mem['kv_bytes_live'] / 1e6:.0f} MB of KV; after 1,000 short conversations opened, used and closed {mem['rss_before_churn'] / 1e6:.0f} → {mem['rss_after_1000'] / 1e6:.0f} MB.")
    w(f"Server: RSS {R['server_rss_loaded'] / 1e6:.0f} MB when SERVING; {R['server_rss_before_churn'] / 1e6:.0f} → {R['server_rss_after_churn'] / 1e6:.0f} MB over 1,000 gRPC conversations (8 streams × 125, 2 short turns each).")
    w("")
    kept = kept_sections(Path(args.out))
    if kept:
        w(kept)
        w("")
    w(hand_written(Path(args.out)))
    return "\n".join(L) + "\n"


# Everything from this line on in BENCHMARKS.md is written by hand and kept as is.
HAND_MARKER = "<!-- Hand-written from here on: bench/run.py carries this part over unchanged. Date each entry. -->"


def hand_written(path):
    """The hand-written analysis of the existing report, verbatim (from the marker on)."""
    old = path.read_text() if path.exists() else ""
    if HAND_MARKER in old:
        return old[old.index(HAND_MARKER):].rstrip("\n")
    return HAND_MARKER + "\n\n## Analysis\n\n(none yet)"


def write_section(path, begin, end, text):
    """Puts `text` (a section from `begin` to `end`, markers included) into
    the report at `path`: in place of the old one, or before the hand-written
    part (bench/memory.py and bench/sessions.py write theirs this way)."""
    doc = path.read_text() if path.exists() else "# Benchmarks\n"
    if begin in doc and end in doc:
        head, rest = doc.split(begin, 1)
        doc = head + text + rest.split(end, 1)[1]
    else:
        marker = "<!-- Hand-written from here on"
        i = doc.find(marker)
        doc = doc[:i] + text + "\n\n" + doc[i:] if i >= 0 else doc + "\n" + text + "\n"
    path.write_text(doc)


def kept_sections(path):
    """The sections other scripts measure (bench/memory.py, bench/sessions.py),
    verbatim from the existing report."""
    old = path.read_text() if path.exists() else ""
    kept = []
    for begin, end in (("<!-- memory: generated by bench/memory.py", "<!-- /memory -->"),
                       ("<!-- sessions: generated by bench/sessions.py", "<!-- /sessions -->")):
        if begin in old and end in old:
            kept.append(old[old.index(begin):old.index(end) + len(end)])
    return "\n\n".join(kept)


if __name__ == "__main__":
    main()
