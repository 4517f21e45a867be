#!/usr/bin/env python3
"""Does a shorter probe retrieve as well as the served one, on the fit part?

    python bench/quality/probe_length.py [--n 400] [--probe '\\nIn one word: "' ...] [--json FILE]

The probe's tokens ride in every turn's model call, so its length is most of
the default vector's extra cost on a short turn (BENCHMARKS.md, the profile).
A 6-token probe scored higher than the served 12-token one on subsets of the
*evaluation* part (QUALITY.md); choosing a probe there would fit the probe to
the evaluation. This scores the served probe and shorter candidates (all of
them off one pass over the texts) on pairs of the *fit* part (the part
the background statistics and the head are fitted on; no evaluated file),
without a head, each probe with PCA whitening fitted on the background corpus run
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

# Candidates, shortest last: each probe's rows ride in every turn's call.
CANDIDATES = ['\nIn one word: "', '\nOne word: "', '\nTopic: "', '\nSummary: "', '\nKeywords: "', ' means "']


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=400, help="fit-part pairs per language")
    ap.add_argument("--probe", action="append", default=None, help="a probe compared with the served one (repeatable; default: CANDIDATES)")
    ap.add_argument("--model", type=Path, default=harness.REAL)
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    sets = datasets.all_sets()
    qwen = Qwen(args.model)
    served = es.load_templates(args.model)["probe"]
    texts = {"served": served} | {f"p{i}": t for i, t in enumerate(args.probe or CANDIDATES)}
    probes = {k: qwen.encode(t) for k, t in texts.items()}
    # Every probe in the first pass over each set; the others are read back.
    cache = harness.Cached(qwen, model_hash(args.model), list(probes.values()))

    def embed(name, items):
        per_probe = {k: cache.embed(name, items, ids) for k, ids in probes.items()}
        return per_probe["served"] | {f"probe@{k}:final": v["probe:final"] for k, v in per_probe.items()}

    bg = embed("background", es.background_items(qwen.encode, qwen.chatml))
    vecs = {}
    for lang in ("python", "rust"):
        pairs = datasets.sample(sets[lang], "fit", args.n)
        q = embed(f"fit-{lang}-q", [(ids, 0, len(ids)) for ids in (qwen.encode(p.query) for p in pairs)])
        d_ids = [qwen.encode(p.doc)[:512] for p in pairs]
        vecs[lang] = (q, embed(f"fit-{lang}-d", [(ids, 0, len(ids)) for ids in d_ids]))
    mean = es.Transform.pca_whiten(bg["mean:final"], harness.WHITEN_COMPONENTS)
    out = {"n": args.n, "probes": {}}
    for name, text in texts.items():
        key = f"probe@{name}:final"
        pw = es.Transform.pca_whiten(bg[key], harness.WHITEN_COMPONENTS)

        def side_by_side(v):
            return np.concatenate([harness.unit_rows(pw.apply(v[key])), harness.unit_rows(mean.apply(v["mean:final"]))], 1)

        rows = {}
        for lang, (q, d) in vecs.items():
            rows[lang] = {
                "probe_whitened": harness.mrr_r1(pw.apply(q[key]), pw.apply(d[key])),
                "probe_mean_whitened": harness.mrr_r1(side_by_side(q), side_by_side(d)),
            }
        out["probes"][name] = {"text": text, "tokens": len(probes[name]), "rows": rows}
        harness.log(f"{name} {text!r} ({len(probes[name])} tokens): {json.dumps(rows)}")
    text = json.dumps(out, indent=1)
    print(text)
    if args.json:
        args.json.write_text(text)


if __name__ == "__main__":
    main()
