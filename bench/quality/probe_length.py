#!/usr/bin/env python3
"""Does a shorter probe retrieve as well as the served one, on the fit part?

    python bench/quality/probe_length.py [--n 400] [--probe '\\nIn one word: "'] [--json FILE]

The probe's tokens ride in every turn's model call, so its length is most of
the default vector's extra cost on a short turn (BENCHMARKS.md, the profile).
A 6-token probe scored higher than the served 12-token one on subsets of the
*evaluation* part (QUALITY.md); choosing a probe there would fit the probe to
the evaluation. This scores both probes on pairs of the *fit* part (the part
the background statistics and the head are fitted on; no evaluated file),
without a head, each with PCA whitening fitted on the background corpus run
with that probe (384 components, the server's default), as PROBE and as
PROBE_MEAN side by side (the training-free form of the default). The model
outputs are cached with the harness's (~/.cache/stateful-embedder/quality).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parents[1] / "models"))

import datasets  # noqa: E402
import embedding_stats as es  # noqa: E402
import run as harness  # noqa: E402
from pooled import Qwen, model_hash  # noqa: E402

SHORT = '\nIn one word: "'


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=400, help="fit-part pairs per language")
    ap.add_argument("--probe", default=SHORT, help="the probe compared with the served one")
    ap.add_argument("--model", type=Path, default=harness.REAL)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    sets = datasets.all_sets()
    qwen = Qwen(args.model)
    cache = harness.Cached(qwen, model_hash(args.model))
    served = es.load_templates(args.model)["probe"]
    bg_items = es.background_items(qwen.encode, qwen.chatml)
    out = {"n": args.n, "probes": {}}
    for name, text in (("served", served), ("short", args.probe)):
        probe = qwen.encode(text)
        bg = cache.embed("background", bg_items, probe)
        whiten = {k: es.Transform.pca_whiten(bg[f"{k}:final"], harness.WHITEN_COMPONENTS) for k in ("probe", "mean")}
        rows = {}
        for lang in ("python", "rust"):
            pairs = datasets.sample(sets[lang], "fit", args.n)
            q = cache.embed(f"fit-{lang}-q", [(ids, 0, len(ids)) for ids in (qwen.encode(p.query) for p in pairs)], probe)
            d_ids = [qwen.encode(p.doc)[:512] for p in pairs]
            d = cache.embed(f"fit-{lang}-d", [(ids, 0, len(ids)) for ids in d_ids], probe)

            def side_by_side(v):
                return np.concatenate([harness.unit_rows(whiten[k].apply(v[f"{k}:final"])) for k in ("probe", "mean")], 1)

            rows[lang] = {
                "probe_whitened": harness.mrr_r1(whiten["probe"].apply(q["probe:final"]), whiten["probe"].apply(d["probe:final"])),
                "probe_mean_whitened": harness.mrr_r1(side_by_side(q), side_by_side(d)),
            }
        out["probes"][name] = {"text": text, "tokens": len(probe), "rows": rows}
        harness.log(f"{name} probe ({len(probe)} tokens): {json.dumps(rows)}")
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
