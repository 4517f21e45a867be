#!/usr/bin/env python3
"""The headline of BENCHMARKS.md as a picture: bench/headline.png.

    python bench/plot.py [--results bench/results.json] [--profile bench/profile.json] [--out bench/headline.png]

Left: the cost of turn k of a conversation of ~45-token turns, on its KV
cache (ours) against re-embedding the whole conversation from scratch (what
a stateless embedding server has to do), by the conversation's length in
tokens (`make bench`'s comparison 2, medians with min-max bars). Right: one
turn on a long context (`se-bench profile`): an 18-token and a 45-token
turn at ~250, ~2,000 and ~6,000 tokens, MEAN raw and the default vector,
beside what re-embedding that whole context would take at the left panel's
rate per token (linear, so an underestimate: attention grows faster).

And bench/shared.png: a new stream behind the same system prompt as many
others (`se-bench shared`, bench/shared.json): the time to its first own
vector with a shared prefix and without, beside its question's cost on a
context it already holds, and the KV bytes of all those conversations.

`make bench` runs this after the runs it reads; the measurements and the
machine are the JSON files'. With `--only-shared`, only bench/shared.png.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

HERE = Path(__file__).resolve().parent


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--results", type=Path, default=HERE / "results.json")
    ap.add_argument("--profile", type=Path, default=HERE / "profile.json")
    ap.add_argument("--out", type=Path, default=HERE / "headline.png")
    ap.add_argument("--shared", type=Path, default=HERE / "shared.json")
    ap.add_argument("--shared-out", type=Path, default=HERE / "shared.png")
    ap.add_argument("--only-shared", action="store_true")
    args = ap.parse_args(argv)
    shared(json.loads(args.shared.read_text()), args.shared_out)
    if args.only_shared:
        return
    r = json.loads(args.results.read_text())
    prof = json.loads(args.profile.read_text())
    per_turn = r["engine"]["turn_tokens"]
    rows = r["engine"]["stateless_vs_stateful"]

    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2), dpi=110)
    x = [row["turn"] * per_turn for row in rows]
    for key, label, color in (("stateless", "re-embedding the whole conversation", "tab:red"), ("stateful", "ours: the turn on its KV cache", "tab:blue")):
        med = [row[key]["median_ms"] for row in rows]
        lo = [m - row[key]["min_ms"] for m, row in zip(med, rows)]
        hi = [row[key]["max_ms"] - m for m, row in zip(med, rows)]
        left.errorbar(x, med, yerr=[lo, hi], marker="o", ms=3, capsize=2, label=label, color=color)
    left.set_xlabel("conversation length after the turn (tokens)")
    left.set_ylabel("ms per ~45-token turn")
    left.set_title("Turn k of a conversation")
    left.set_ylim(bottom=0)
    left.grid(alpha=0.3)
    left.legend(loc="upper left", fontsize=8)

    # Re-embedding cost per token of context, from the left panel's longest conversation.
    last = rows[-1]
    per_token = last["stateless"]["median_ms"] / (last["turn"] * per_turn)
    for turn, marker in (("short", "o"), ("turn45", "s")):
        pts = [p for p in prof["rows"] if p["turn"] == turn]
        ctx = [p["context"] for p in pts]
        n = pts[0]["turn_tokens"]
        right.plot(ctx, [p["turn_mean_raw_ms"] for p in pts], marker=marker, color="tab:blue", label=f"ours, {n}-token turn, MEAN raw")
        right.plot(ctx, [p["turn_default_ms"] for p in pts], marker=marker, color="tab:green", label=f"ours, {n}-token turn, default vector")
    ctx = sorted({p["context"] for p in prof["rows"]})
    right.plot(ctx, [c * per_token for c in ctx], "--", color="tab:red", label="re-embedding the context: the left's rate, linear\n(an underestimate: attention grows faster)")
    right.set_xlabel("context before the turn (tokens)")
    right.set_ylabel("ms per turn")
    right.set_yscale("log")
    right.set_title("One turn on a long conversation (se-bench profile)")
    right.grid(alpha=0.3, which="both")
    right.legend(loc="upper left", fontsize=7)

    m = r["machine"]
    fig.suptitle(f"{prof['model']}, f32, {m['cores']} cores, {m['cpu']}, ONNX Runtime {m['onnxruntime']} ({r['date']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(args.out)
    print(f"wrote {args.out}")


def shared(sh, out):
    """bench/shared.png from `se-bench shared`'s JSON."""
    fig, ax = plt.subplots(figsize=(6.2, 4.4), dpi=110)
    bars = [
        ("without sharing:\nthe prompt, then\nthe question", sh["first_vector_unshared_ms"], "tab:red"),
        ("with a shared prefix:\nthe prompt answered,\nthen the question", sh["first_vector_shared_ms"], "tab:blue"),
        ("the question alone,\non a context\nit already holds", sh["cached_turn_ms"], "tab:gray"),
    ]
    ax.bar([b[0] for b in bars], [b[1] for b in bars], color=[b[2] for b in bars])
    for i, (_, v, _) in enumerate(bars):
        ax.text(i, v, f"{v:,.0f} ms", ha="center", va="bottom", fontsize=9)
    ax.set_ylabel("ms to the stream's first own vector (median)")
    ax.tick_params(axis="x", labelsize=8)
    n = sh["conversations"]
    ax.text(0.98, 0.95, f"KV of {n:,} such conversations:\n{sh['kv_bytes_shared'] / 1e6:,.0f} MB shared\n"
            f"{sh['kv_bytes_unshared_total'] / 1e6:,.0f} MB unshared",
            transform=ax.transAxes, ha="right", va="top", fontsize=9)
    ax.grid(alpha=0.3, axis="y")
    ax.set_title(f"A new stream behind a {sh['prompt_tokens']}-token system prompt shared by {n:,} streams", fontsize=10)
    features = " ".join(k for k, v in re.findall(r"(\w+): (true|false)", sh["cpu_features"]) if v == "true")
    fig.suptitle(f"{Path(sh['model']).parent.name}, f32, default vector; CPU features: {features}", fontsize=8)
    fig.tight_layout()
    fig.savefig(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
