#!/usr/bin/env python3
"""Where a turn's model call spends its time, by ONNX Runtime's own profiler.

    python bench/ort_profile.py [--model DIR] [--contexts 250,2000,6000] [--reps 5] [--json FILE]

For each context length: a context of that many tokens is prefilled (in
512-token chunks, as the server does), then a short (18-token) and a
45-token turn (the ones `se-bench profile` times) run on top of its cache `--reps` times with ONNX Runtime's
profiler on (same graph and thread count as the server: the f32 model.onnx,
2 intra-op threads). Each node's kernel time is summed per call and sorted
into: attention (the QK^T scores, the mask add, the softmax, probs x V, and
the transposes/reshapes around them), the cache concat (past + new into
`present.*`, the copy se-bench's "cache copy" stands in for), and the rest
(the weight MatMuls, norms, RoPE, SwiGLU...). Medians over the reps, in ms;
"outside kernels" is the run's wall time minus the kernels' sum (ONNX
Runtime's own scheduling, input/output handling).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from tokenizers import Tokenizer

ROOT = Path(__file__).resolve().parents[1]

# The turns `se-bench profile` times: its short chat turn (18 tokens) and the
# first line of bench/turns.txt (45 tokens).
SHORT = "Can you make this function easier to test, and add a short docstring to it?"
TURN45 = next(line for line in (ROOT / "bench/turns.txt").read_text().splitlines() if line.strip())

# The model tool (models/qwen_onnx.py) names each node's output after what it
# is (`l{i}_scores_149`...); the concats of the cache are named nodes.
ATTENTION = re.compile(r"^(l\d+_(qg|kt|scores|masked|probs|ctx|ctx_heads|ctx_t|ctx_m)|q_pos|k_pos|q_col|causal|pad|pad4|allowed|allowed_rep|mask_bias)$")
CONCAT = re.compile(r"^l\d+_cat_[kv]$")


def hints(model_file: Path) -> dict[str, str]:
    """Node name -> what its output is (the builder's hint, its counter cut)."""
    graph = onnx.load(str(model_file), load_external_data=False).graph
    return {n.name: re.sub(r"_\d+$", "", n.output[0]) if n.output else n.name for n in graph.node}


def kind(node: str, hint: dict[str, str]) -> str:
    # ONNX Runtime names a fused node `{first node}/{Fusion}/`.
    base = node.split("/")[0]
    if CONCAT.match(base):
        return "cache concat"
    if ATTENTION.match(hint.get(base, "")):
        return "attention"
    return "rest"


class Model:
    def __init__(self, model_dir: Path, threads: int):
        self.dir = model_dir
        self.threads = threads
        so = ort.SessionOptions()
        so.intra_op_num_threads = threads
        self.plain = ort.InferenceSession(str(model_dir / "model.onnx"), so, providers=["CPUExecutionProvider"])
        inputs = self.plain.get_inputs()
        self.past_names = [i.name for i in inputs if i.name.startswith("past_key_values.")]
        self.kv_heads, self.head_dim = inputs[3].shape[1], inputs[3].shape[3]
        self.tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))

    def feeds(self, ids: list[int], past: dict | None, past_len: int) -> dict:
        s = len(ids)
        f = {
            "input_ids": np.array([ids], np.int64),
            "attention_mask": np.ones((1, past_len + s), np.int64),
            "position_ids": np.arange(past_len, past_len + s, dtype=np.int64)[None],
        }
        for name in self.past_names:
            present = name.replace("past_key_values", "present")
            f[name] = past[present] if past else np.zeros((1, self.kv_heads, 0, self.head_dim), np.float32)
        return f

    def run(self, sess, ids, past, past_len):
        names = [o.name for o in sess.get_outputs()]
        out = sess.run(names, self.feeds(ids, past, past_len))
        return dict(zip(names, out))


def context_ids(tok: Tokenizer, n: int) -> list[int]:
    lines = []
    i = 0
    ids: list[int] = []
    while len(ids) < n:
        lines.append(f"    total_{i} = compute_{i}(values[{i}], weight={i % 7}) + offset  # step {i}")
        i += 1
        if i % 20 == 0:
            ids = tok.encode("\n".join(lines), add_special_tokens=False).ids
    return tok.encode("\n".join(lines), add_special_tokens=False).ids[:n]


def profile(m: Model, contexts: list[int], reps: int) -> list[dict]:
    hint = hints(m.dir / "model.onnx")
    rows = []
    for n in contexts:
        ids = context_ids(m.tok, n)
        past, done = None, 0
        while done < len(ids):
            chunk = ids[done : done + 512]
            out = m.run(m.plain, chunk, past, done)
            past = {k: v for k, v in out.items() if k.startswith("present.")}
            done += len(chunk)
        for name, text in (("short", SHORT), ("turn45", TURN45)):
            turn = m.tok.encode(text, add_special_tokens=False).ids
            with tempfile.TemporaryDirectory() as work:
                so = ort.SessionOptions()
                so.intra_op_num_threads = m.threads
                so.enable_profiling = True
                so.profile_file_prefix = os.path.join(work, "ort")
                sess = ort.InferenceSession(str(m.dir / "model.onnx"), so, providers=["CPUExecutionProvider"])
                walls = []
                m.run(sess, turn, past, n)  # warm-up
                for _ in range(reps):
                    t0 = time.perf_counter()
                    m.run(sess, turn, past, n)
                    walls.append((time.perf_counter() - t0) * 1e3)
                trace = json.loads(Path(sess.end_profiling()).read_text())
            # One "model_run" event per run; the kernels that fall in it.
            runs = sorted((e["ts"], e["ts"] + e["dur"]) for e in trace if e.get("cat") == "Session" and e.get("name") == "model_run")
            per_run = [dict.fromkeys(("attention", "cache concat", "rest"), 0.0) for _ in runs]
            for e in trace:
                if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
                    continue
                node = e["name"][: -len("_kernel_time")]
                for r, (start, end) in enumerate(runs):
                    if start <= e["ts"] <= end:
                        per_run[r][kind(node, hint)] += e["dur"] / 1e3
                        break
            per_run = per_run[1:]  # the warm-up's
            med = {k: statistics.median(r[k] for r in per_run) for k in per_run[0]}
            wall = statistics.median(walls)
            row = {"context": n, "turn": name, "turn_tokens": len(turn), "wall_ms": wall, **{f"{k}_ms": v for k, v in med.items()}}
            row["outside_kernels_ms"] = wall - sum(med.values())
            print(f"[ort-profile] {json.dumps(row)}", file=sys.stderr, flush=True)
            rows.append(row)
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", type=Path, default=ROOT / "models/qwen2.5-coder-0.5b-instruct")
    ap.add_argument("--contexts", default="250,2000,6000")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    m = Model(args.model, args.threads)
    rows = profile(m, [int(c) for c in args.contexts.split(",")], args.reps)
    out = {"model": str(args.model), "onnxruntime": ort.__version__, "threads": args.threads, "reps": args.reps, "rows": rows}
    text = json.dumps(out, indent=1)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
