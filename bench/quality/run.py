#!/usr/bin/env python3
"""`make quality`: how well the served model's vectors retrieve, per
configuration, against all-MiniLM-L6-v2 in the same run.

    python bench/quality/run.py [--n 800] [--out QUALITY.md] [--json bench/quality/results.json]
    python bench/quality/run.py --fit-head   # refit models/heads/<model>.safetensors
    python bench/quality/run.py --fit-head --also-probe TEXT   # and cache TEXT's vectors in the same passes
    python bench/quality/run.py --model DIR --fit-head --head-out FILE [--stats-out FILE]   # for DIR's card's probe
    python bench/quality/run.py --sets python,rust,conv_long --n 400 --own-heads convmean   # a partial run

Sets (bench/quality/datasets.py): docstring -> code in Python (standard
library) and Rust (cargo registry), held-out Python (third-party packages in
.venv), and three conversation sets. Each query ranks every document of its
set; MRR@10 and R@1 are reported. Statistics (centering, z-score, PCA
whitening) come from the background corpus the model tool fits on
(models/background.jsonl: fit-part files only), the learned head from the
head pairs (models/head_pairs.jsonl: fit-part files only), never from
evaluated files. Two more heads are fitted here, on one language's pairs
each, to show the served one generalises rather than memorises.
"""

from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(ROOT / "models"))

import datasets  # noqa: E402
import embedding_stats as es  # noqa: E402
from minilm import MiniLM, find_model, read_safetensors  # noqa: E402
from pooled import HARNESS_LAYERS, Qwen, model_hash  # noqa: E402

REAL = ROOT / "models/qwen2.5-coder-0.5b-instruct"
WHITEN_COMPONENTS = 384  # the server's DEFAULT_WHITEN_COMPONENTS
CACHE = Path.home() / ".cache/stateful-embedder/quality"
CHUNK = 500  # texts per cached part


def log(msg):
    print(f"[quality] {msg}", file=sys.stderr, flush=True)


def mrr_r1(q: np.ndarray, d: np.ndarray) -> tuple[float, float]:
    q = q / np.linalg.norm(q, axis=1, keepdims=True)
    d = d / np.linalg.norm(d, axis=1, keepdims=True)
    sims = q @ d.T
    target = np.diag(sims)[:, None]
    # 1-based rank of the right document, ties counted against it (identical
    # vectors, e.g. texts truncated to the same prefix, rank nothing first).
    rank = (sims >= target).sum(1)
    mrr = np.where(rank <= 10, 1.0 / rank, 0.0).mean()
    return float(mrr), float((rank == 1).mean())


class Cached:
    """Per-text model outputs, cached on disk by model and token ids: the
    texts' own poolings in one file, each probe's vectors in another. The
    probes in `also` are run in the same passes as the asked one (a text's
    outputs do not depend on what follows it), so a later run with one of
    them as its probe (another model directory's card) finds them here."""

    def __init__(self, qwen: Qwen, mhash: str, also: list[list[int]] = ()):
        self.qwen, self.dir, self.also = qwen, CACHE / mhash, [list(p) for p in also]
        self.dir.mkdir(parents=True, exist_ok=True)

    def _path(self, name: str, items, probe) -> Path:
        h = hashlib.sha256(json.dumps([items, probe, self.qwen.keys, "v2"]).encode()).hexdigest()[:16]
        return self.dir / f"{name}-{h}{'' if probe is None else '.probe'}.npz"

    @staticmethod
    def _load(path: Path) -> dict[str, np.ndarray]:
        with np.load(path) as z:
            return {k: z[k] for k in z.files}

    def embed(self, name: str, items, probe):
        # Large sets in parts of CHUNK texts, each cached as it is done, so
        # an interrupted run (the head pairs are over an hour) resumes.
        if len(items) > CHUNK:
            parts = [self.embed(f"{name}.{i // CHUNK}", items[i : i + CHUNK], probe) for i in range(0, len(items), CHUNK)]
            return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
        probe = list(probe)
        text, mine = self._path(name, items, None), self._path(name, items, probe)
        if text.exists() and mine.exists():
            return self._load(text) | self._load(mine)
        runs = [probe] + [p for p in self.also if p != probe and not self._path(name, items, p).exists()]
        t0 = time.perf_counter()
        res = self.qwen.embed(items, probes={str(i): p for i, p in enumerate(runs)})
        log(f"{name}: {len(items)} texts, {sum(len(i[0]) for i in items)} tokens, {len(runs)} probe(s), {time.perf_counter() - t0:.0f} s")
        own = {k: v for k, v in res.items() if not k.startswith("probe@")}
        np.savez(text, **own)
        for i, p in enumerate(runs):
            vecs = {k.replace(f"probe@{i}:", "probe:"): v for k, v in res.items() if k.startswith(f"probe@{i}:")}
            np.savez(self._path(name, items, p), **vecs)
        return own | self._load(mine)


def posts(background: dict[str, np.ndarray], key: str, served: dict[str, np.ndarray] | None) -> dict[str, es.Transform]:
    """The transforms compared for one pooled vector: fitted here on the
    background vectors (exploration), and, for the final layer, the served
    ones read from the model's embedding_stats.safetensors ("served",
    "served_whiten")."""
    b = background[key]
    out = {"raw": es.Transform.identity(b.shape[1]), "center": es.Transform.center(b), "zscore": es.Transform.zscore(b)}
    for k in (128, 256, 512):
        out[f"pca{k}"] = es.Transform.pca_whiten(b, k)
    # The conversation's mean is standardised with the turn mean's statistics, as the server does.
    pooling = {"mean:final": "mean", "convmean:final": "mean", "last:final": "last_token", "probe:final": "probe"}.get(key)
    if served is not None and pooling:
        z = es.Transform(served[f"{pooling}.mean"], served[f"{pooling}.inv_std"])
        out["served"] = z
        out["served_whiten"] = es.Transform(z.mean, None, served[f"{pooling}.whiten"][:, :WHITEN_COMPONENTS])
    return out


def unit_rows(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


class ServedHead:
    """The served head (embedding_head.safetensors) in numpy, as the server
    applies it: [unit((probe - mean) @ proj), unit((mean - mean) @ proj)] @ head."""

    def __init__(self, t: dict[str, np.ndarray], mean_key: str = "mean", width: int | None = None):
        self.t, self.mean_key, self.width = t, mean_key, width

    def __call__(self, v: dict[str, np.ndarray]) -> np.ndarray:
        t = self.t
        parts = (("probe", "probe"), (self.mean_key, "mean"))
        x = np.concatenate([unit_rows((v[f"{k}:final"] - t[f"{s}.mean"]) @ t[f"{s}.proj"]) for k, s in parts], 1)
        # `dimensions`: the head's first components (it is rotated so they carry the most).
        return (x @ t["head"].astype(np.float64))[:, : self.width]


def side_by_side(served: dict[str, np.ndarray], k: int = WHITEN_COMPONENTS, mean_key: str = "mean"):
    """POOLING_PROBE_MEAN with STANDARDIZE_WHITEN, as the server does it:
    each vector whitened with the statistics (k components), normalised, side by side."""

    def f(v):
        return np.concatenate([unit_rows((v[f"{p}:final"] - served[f"{s}.mean"]) @ served[f"{s}.whiten"][:, :k]) for p, s in (("probe", "probe"), (mean_key, "mean"))], 1)

    return f


class CachedEmbed:
    """embed(name, items) for es.write_head over the harness's cache."""

    def __init__(self, cache: "Cached", probe_ids: list[int], probe_text: str):
        self.cache, self.probe, self.probe_text = cache, probe_ids, probe_text

    def items_by_set(self, rows):
        q = self.cache.qwen
        return es.head_items(q.encode, q.chatml, rows)

    def __call__(self, name, items):
        return self.cache.embed(name, items, self.probe)


def fit_heads_here(background, embed, log, which=("python_only", "rust_only")) -> dict[str, "es.HeadInput"]:
    """Heads fitted here, as callables: on one language's head pairs each
    (the generalisation check: each scored on the other language), and on
    every pair with the conversation's mean in place of the turn's (issue 24
    item 6: a head for MEAN_OVER_CONVERSATION; a single text's conversation
    mean is its own mean)."""
    rows = es.head_pairs()
    x = es.HeadInput(background)
    vecs = es.embed_sets(embed, rows)
    files: dict[str, list[str]] = {}
    for r in rows:
        files.setdefault(r["set"], []).append(r["file"])
    heads = {}
    for lang in ("python", "rust"):
        if f"{lang}_only" not in which:
            continue
        qs, ds = vecs[lang]
        xq, xd = x(qs), x(ds)
        v = es.validation_files(files[lang])
        w, score, step = es.fit_head([(xq[~v], xd[~v])], [(xq[v], xd[v])])
        log(f"head fitted on {lang} only: validation MRR@10 {score:.4f} at step {step}")
        heads[f"{lang}_only"] = (lambda vv, w=w: x(vv) @ w)
    if "convmean" not in which:
        return heads
    xc = es.HeadInput(background, mean_key="convmean")
    groups, val = [], []
    for name, (qs, ds) in vecs.items():
        xq, xd = xc(qs), xc(ds)
        v = es.validation_files(files[name])
        groups.append((xq[~v], xd[~v]))
        val.append((xq[v], xd[v]))
    w, score, step = es.fit_head(groups, val)
    log(f"head fitted for the conversation mean: validation MRR@10 {score:.4f} at step {step}")
    heads["convmean"] = (lambda vv, w=w: xc(vv) @ w)
    return heads


def time_single(qwen: Qwen, texts: list[list[int]], probe: list[int]) -> dict[str, float]:
    """Milliseconds per text, one text per call (as a lone stream's turn)."""
    configs = (("pass", None, False), ("pass+inline probe", None, True), ("pass+probe", probe, False))
    out = dict.fromkeys((c[0] for c in configs), 0.0)
    for ids in texts:  # the configurations alternate, so a busy moment hits all alike
        for name, pr, inline in configs:
            t0 = time.perf_counter()
            qwen.embed([(ids + probe if inline else ids, 0, len(ids))], pr)
            out[name] += (time.perf_counter() - t0) / len(texts) * 1000
    return out


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=800, help="evaluated pairs per set")
    ap.add_argument("--heldout", type=int, default=400, help="evaluated held-out pairs")
    ap.add_argument("--conversations", type=int, default=200)
    ap.add_argument("--smoke", action="store_true", help="a few texts of each kind, to check the harness runs")
    ap.add_argument("--model", type=Path, default=REAL)
    ap.add_argument("--json", type=Path, default=HERE / "results.json")
    ap.add_argument("--out", type=Path, default=ROOT / "QUALITY.md")
    ap.add_argument("--write-background", action="store_true", help="rewrite models/background.jsonl from the fit part")
    ap.add_argument("--write-head-pairs", action="store_true", help="rewrite models/head_pairs.jsonl from the fit part")
    ap.add_argument("--fit-head", action="store_true", help="fit the learned head on models/head_pairs.jsonl (vectors cached here) and write models/heads/<model>.safetensors, the head prepare.py ships")
    ap.add_argument("--head-out", type=Path, default=None, help="with --fit-head: write the head here instead (a head for another probe, say)")
    ap.add_argument("--stats-out", type=Path, default=None, help="with --fit-head: also write the background statistics here, from the cached vectors (with --head-out into a model directory whose card names another probe, what this harness then scores as served)")
    ap.add_argument("--also-probe", action="append", default=[], help="a probe computed in the same passes and cached, for a later run whose model card has it (repeatable)")
    ap.add_argument("--report-only", action="store_true", help="rewrite --out from --json without running anything")
    ap.add_argument("--sets", default="python,rust,heldout,conv_two_turn,conv_multi_turn,conv_long", help="the sets to score (comma-separated; a partial run, e.g. with --out elsewhere)")
    ap.add_argument("--own-heads", default="python_only,rust_only", help="which of the heads fitted here to fit (comma-separated; convmean is the shipped head's own fit since 2026-12-05, a reproducibility check worth a rerun only after the fit changes)")
    ap.add_argument("--no-own-heads", action="store_true", help="skip the heads fitted here (on one language each, and the conversation mean's: the check rows; their 9,200 pairs are most of a run's model time)")
    args = ap.parse_args(argv)
    unknown = set(args.own_heads.split(",")) - {"python_only", "rust_only", "convmean"}
    if unknown:
        ap.error(f"--own-heads: unknown {sorted(unknown)} (python_only, rust_only, convmean)")
    if args.report_only:
        write_report(json.loads(args.json.read_text()), args.out)
        return

    log("building the sets")
    sets = datasets.all_sets()
    for k, v in sets.items():
        log(f"{k}: {len(v)} pairs ({sum(p.part == 'fit' for p in v)} fit, {sum(p.part == 'eval' for p in v)} eval)")
    empty = [k for k in ("python", "rust", "heldout") if k in args.sets.split(",") and not sets.get(k)]
    if empty and not (args.write_background or args.write_head_pairs or args.fit_head):
        sys.exit(f"no pairs for {empty}: the rust set reads the cargo registry (run `cargo fetch` in the project), heldout the packages in .venv")
    if args.write_background:
        es.write_background(sets)
        return
    if args.write_head_pairs:
        es.write_head_pairs(sets)
        return
    qwen = Qwen(args.model, CACHE / "graph", HARNESS_LAYERS)
    templates = es.load_templates(args.model)
    probe_ids = qwen.encode(templates["probe"])
    cache = Cached(qwen, model_hash(args.model), [qwen.encode(p) for p in args.also_probe])
    log(f"probe {templates['probe']!r} ({len(probe_ids)} tokens; the card's in {args.model})")
    query_prefix = templates["input_types"]["query"]

    # Background statistics, as the model tool fits them.
    bg_items = es.background_items(qwen.encode, qwen.chatml)
    if args.smoke:
        bg_items = bg_items[::40]
    background = cache.embed("background", bg_items, probe_ids)
    embed = CachedEmbed(cache, probe_ids, templates["probe"])
    if args.fit_head:
        name = json.loads((args.model / "config.json").read_text())["name"]
        es.HEADS.mkdir(exist_ok=True)
        out = args.head_out or es.HEADS / f"{name}.safetensors"
        es.write_head(name, out, background, embed, log=log)
        log(f"wrote {out}; `make models` installs it beside the model")
        if args.stats_out:
            es.write_stats(args.model, name, args.stats_out, background)
            log(f"wrote {args.stats_out}")
        return

    stats_file = args.model / "embedding_stats.safetensors"
    served = read_safetensors(stats_file) if stats_file.exists() else None
    if served is None:
        log(f"{stats_file} is missing: only the harness's own transforms are measured")
    head_file = args.model / "embedding_head.safetensors"
    served_head = ServedHead(read_safetensors(head_file)) if head_file.exists() else None
    if served_head is None:
        log(f"{head_file} is missing: the learned head is not measured")
    own_heads = {} if args.smoke or args.no_own_heads else fit_heads_here(background, embed, log, args.own_heads.split(","))
    wanted = set(args.sets.split(","))
    mini = MiniLM(find_model(ROOT / ".venv"))
    results = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="minutes"), "cpu": platform.processor() or platform.machine(), "sets": {}}

    def mini_cached(name, texts):
        h = hashlib.sha256(json.dumps(texts).encode()).hexdigest()[:16]
        path = CACHE / f"minilm-{name}-{h}.npy"
        if path.exists():
            return np.load(path)
        v = mini.embed(texts)
        np.save(path, v)
        return v

    def run_set(name, queries, docs_items, docs_texts):
        raw_q = cache.embed(f"{name}-q", [(ids, 0, len(ids)) for ids in (qwen.encode(q) for q in queries)], probe_ids)
        pre_ids = qwen.encode(query_prefix.split("{text}")[0])
        post_ids = qwen.encode(query_prefix.split("{text}")[1]) if query_prefix.split("{text}")[1] else []
        # As the server tokenises a template: each part on its own.
        tpl_items = []
        for q in queries:
            ids = qwen.encode(q)
            tpl_items.append((pre_ids + ids + post_ids, len(pre_ids), len(pre_ids) + len(ids)))
        tpl_q = cache.embed(f"{name}-qt", tpl_items, probe_ids)
        d = cache.embed(f"{name}-d", docs_items, probe_ids)
        rows = {}
        for key in [f"{p}:{k}" for p in ("mean", "convmean", "last", "probe") for k in qwen.keys]:
            for pname, t in posts(background, key, served).items():
                for qname, qv in (("raw", raw_q), ("query", tpl_q)):
                    rows[f"{key}|{pname}|q={qname}"] = mrr_r1(t.apply(qv[key]), t.apply(d[key]))
        mq = mini_cached(f"{name}-q", queries)
        md = mini_cached(f"{name}-d", docs_texts)
        rows["minilm"] = mrr_r1(mq, md)
        # POOLING_PROBE_MEAN: the served head, the training-free side by
        # side, and the heads fitted here on one language only.
        probe_mean = {}
        if served_head is not None:
            probe_mean["served_head"] = served_head
            # Truncated widths (the `dimensions` option) of the default.
            for w in WIDTHS:
                probe_mean[f"served_head_convmean@{w}"] = ServedHead(served_head.t, mean_key="convmean", width=w)
            # The conversation's mean (the default; the head is fitted for it).
            probe_mean["served_head_convmean"] = ServedHead(served_head.t, mean_key="convmean")
        if served is not None:
            probe_mean["whiten"] = side_by_side(served)
            probe_mean["whiten_convmean"] = side_by_side(served, mean_key="convmean")
        for head, f in own_heads.items():
            probe_mean[f"head_{head}"] = f
        for pname, f in probe_mean.items():
            for qname, qv in (("raw", raw_q), ("query", tpl_q)):
                rows[f"probe_mean|{pname}|q={qname}"] = mrr_r1(f(qv), f(d))
        results["sets"][name] = {"n": len(queries), "rows": rows}
        best = sorted(((v[0], k) for k, v in rows.items() if k != "minilm"), reverse=True)[:5]
        log(f"{name}: minilm {rows['minilm'][0]:.3f}; raw MEAN {rows['mean:final|raw|q=raw'][0]:.3f}; best {best[0][1]} {best[0][0]:.3f}")

    for name in ("python", "rust", "heldout"):
        if name not in sets or name not in wanted:
            continue
        pairs = datasets.sample(sets[name], "eval", args.heldout if name == "heldout" else args.n)
        items = []
        for p in pairs:
            ids = qwen.encode(p.doc)[: 512]
            items.append((ids, 0, len(ids)))
        run_set(name, [p.query for p in pairs], items, [p.doc for p in pairs])

    for kind in ("two_turn", "multi_turn", "long"):
        if f"conv_{kind}" not in wanted:
            continue
        convs = datasets.conversations(sets["python"], kind, args.conversations)
        items = [qwen.chatml(c.turns) for c in convs]
        run_set(f"conv_{kind}", [c.query for c in convs], items, ["\n".join(t for _, t in c.turns) for c in convs])

    # Cost: one text per call, as a lone stream's turn.
    sample = [qwen.encode(p.doc)[:512] for p in datasets.sample(sets["python"], "eval", 32)]
    results["cost_ms_per_text"] = time_single(qwen, sample, probe_ids)
    results["cost_tokens"] = {"probe": len(probe_ids), "query_prefix": len(qwen.encode(query_prefix.split("{text}")[0])), "mean_doc": float(np.mean([len(s) for s in sample]))}
    t0 = time.perf_counter()
    mini.embed([p.doc for p in datasets.sample(sets["python"], "eval", 32)], batch=1)
    results["cost_ms_per_text"]["minilm"] = (time.perf_counter() - t0) / 32 * 1000
    results["sizes"] = {k: len(v) for k, v in sets.items()}
    results["model"] = str(args.model.relative_to(ROOT) if args.model.is_relative_to(ROOT) else args.model)
    results["cpu_features"] = cpu_features()
    args.json.write_text(json.dumps(results, indent=1))
    log(f"wrote {args.json}")
    write_report(results, args.out)
    log(f"wrote {args.out}")


def cpu_features() -> str:
    try:
        flags = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")).split()
        model = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("model name")).split(":", 1)[1].strip()
    except (OSError, StopIteration):
        return platform.machine()
    want = ["avx2", "fma", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8"]
    return f"{model}: " + " ".join(f for f in want if f in flags)


# What the server offers, by the harness's row names (pooling:layer|transform|q=query template).
SERVED = [
    # A single text's conversation mean is its own mean: on the code sets the
    # default row is Embed's vector, on the conversation sets a stream's.
    ("PROBE_MEAN over the conversation, learned head (the default)", "probe_mean|served_head_convmean|q=raw"),
    ("the default, first 512 of 768 dims (`dimensions: 512`)", "probe_mean|served_head_convmean@512|q=raw"),
    ("the default, first 256 dims", "probe_mean|served_head_convmean@256|q=raw"),
    ("the default, first 128 dims", "probe_mean|served_head_convmean@128|q=raw"),
    ("PROBE_MEAN, learned head, MEAN_OVER_TURN", "probe_mean|served_head|q=raw"),
    ("PROBE_MEAN, learned head, query input type", "probe_mean|served_head|q=query"),
    ("PROBE_MEAN, head fitted on Python pairs only (check)", "probe_mean|head_python_only|q=raw"),
    ("PROBE_MEAN, head fitted on Rust pairs only (check)", "probe_mean|head_rust_only|q=raw"),
    ("PROBE_MEAN, whitened (side by side, no head)", "probe_mean|whiten|q=raw"),
    ("PROBE_MEAN, whitened, query input type", "probe_mean|whiten|q=query"),
    ("PROBE, whitened (the previous Embed default)", "probe:final|served_whiten|q=raw"),
    ("PROBE, whitened, query input type", "probe:final|served_whiten|q=query"),
    ("PROBE, z-score", "probe:final|served|q=raw"),
    ("PROBE, raw", "probe:final|raw|q=raw"),
    ("MEAN, whitened", "mean:final|served_whiten|q=raw"),
    ("MEAN, z-score (the previous Converse default)", "mean:final|served|q=raw"),
    ("MEAN, z-score, query input type", "mean:final|served|q=query"),
    ("MEAN, raw (STANDARDIZE_NONE: the first default)", "mean:final|raw|q=raw"),
    ("MEAN over the conversation, z-score (MEAN_OVER_CONVERSATION)", "convmean:final|served|q=raw"),
    ("MEAN over the conversation, whitened", "convmean:final|served_whiten|q=raw"),
    ("MEAN over the conversation, raw", "convmean:final|raw|q=raw"),
    ("PROBE_MEAN over the conversation, whitened (side by side, no head)", "probe_mean|whiten_convmean|q=raw"),
    ("PROBE_MEAN over the conversation, head fitted here (check: the shipped head's fit again)", "probe_mean|head_convmean|q=raw"),
    ("LAST_TOKEN, z-score", "last:final|served|q=raw"),
    ("LAST_TOKEN, raw", "last:final|raw|q=raw"),
]
DEFAULT_ROW = "probe_mean|served_head_convmean|q=raw"
WIDTHS = (128, 256, 512)  # of the head's 768
MARKER = "<!-- Hand-written from here on: make quality keeps everything below this line. -->"


def write_report(r: dict, out: Path) -> None:
    sets = r["sets"]
    code_sets = [s for s in ("python", "rust", "heldout") if s in sets]
    conv_sets = [s for s in sets if s.startswith("conv_")]

    def cell(name, row):
        v = sets[name]["rows"].get(row)
        return "–" if v is None else f"{v[0]:.3f} / {v[1]:.3f}"

    def table(names, extra_rows):
        lines = ["| configuration | " + " | ".join(f"{n} (n={sets[n]['n']})" for n in names) + " |", "|---|" + "---|" * len(names)]
        lines.append("| all-MiniLM-L6-v2 (anchor) | " + " | ".join(cell(n, "minilm") for n in names) + " |")
        for label, row in SERVED + extra_rows:
            lines.append(f"| {label} | " + " | ".join(cell(n, row) for n in names) + " |")
        return "\n".join(lines)

    def best(names, prefix=""):
        rows = [k for k in sets[names[0]]["rows"] if k != "minilm" and k.startswith(prefix)]
        scored = sorted(rows, key=lambda k: -np.mean([sets[n]["rows"][k][0] for n in names]))
        return scored[:3]

    code_best = best(code_sets)
    conv_best = best(conv_sets)
    ratio = {n: sets[n]["rows"][DEFAULT_ROW][0] / sets[n]["rows"]["minilm"][0] for n in sets if DEFAULT_ROW in sets[n]["rows"] and sets[n]["rows"]["minilm"][0] > 0}
    cost = r["cost_ms_per_text"]
    tok = r["cost_tokens"]
    layer_rows = []
    for key in sorted({k.split("|")[0] for k in sets[code_sets[0]]["rows"] if ":" in k.split("|")[0]}, key=lambda k: (k.split(":")[0], k.split(":")[1] != "final", int(k.split(":")[1]) if k.split(":")[1].isdigit() else 0)):
        cells = []
        for post in ("raw", "center", "zscore", "pca128", "pca256", "pca512"):
            row = f"{key}|{post}|q=raw"
            cells.append(f"{np.mean([sets[n]['rows'][row][0] for n in ('python', 'rust')]):.3f}")
        layer_rows.append(f"| {key} | " + " | ".join(cells) + " |")
    text = f"""# Embedding quality

Generated by `make quality` (bench/quality/run.py) on {r['date']}, model
`{r['model']}` (f32), CPU {r['cpu_features']}. Every figure below is from that
one run; each cell is **MRR@10 / R@1** (each query ranks every document of its
set; the right one is its own pair's).

Sets (bench/quality/datasets.py), built from code on the machine, split by
file into a fit part and an evaluation part (only the evaluation part is
scored; the background statistics come from the fit part of the Python
standard library, `models/background.jsonl`):
python = standard-library functions with a docstring ({r['sizes'].get('python')} pairs in all),
rust = `///`-documented functions of the cargo registry's crates ({r['sizes'].get('rust')} pairs),
heldout = functions of the third-party packages in .venv ({r['sizes'].get('heldout')} pairs; nothing was fitted on them, not even the background).
The query is the docstring's first sentence, the document the function without it.
Conversation sets: turn 1 is a user turn "Here is a function from my project:" with the code,
later turns are the same follow-ups in every conversation (two_turn: one, multi_turn: three);
long: a 512-token system prompt shared by all, the code, then a 300-token shared follow-up
(the telling detail sits more than 300 tokens before the end, and past the 256 tokens MiniLM reads).
MiniLM embeds the conversation's turns concatenated, truncated to 256 tokens as it was trained.

## Docstring → code

{table(code_sets, [])}

The default (PROBE_MEAN with the learned head) reaches {", ".join(f"{n} {ratio[n]:.2f}×" for n in code_sets if n in ratio)} of MiniLM's MRR@10.
Best configurations found (mean over the three sets): {"; ".join(f"`{k}` {np.mean([sets[n]['rows'][k][0] for n in code_sets]):.3f}" for k in code_best)}
(MiniLM {np.mean([sets[n]['rows']['minilm'][0] for n in code_sets]):.3f}).

## Conversations

{table(conv_sets, [])}

The default over a conversation's stream against MiniLM over its concatenated text: {", ".join(f"{n} {ratio[n]:.2f}×" if n in ratio else f"{n} {sets[n]['rows'][DEFAULT_ROW][0]:.3f} vs 0" for n in conv_sets if DEFAULT_ROW in sets[n]["rows"])}.
Best configurations found: {"; ".join(f"`{k}` {np.mean([sets[n]['rows'][k][0] for n in conv_sets]):.3f}" for k in conv_best)}.

## Cost per text

One text per model call, as a lone stream's turn (the harness's onnxruntime
session, same graph as the server), {tok['mean_doc']:.0f}-token documents on average:
one pass (MEAN, LAST_TOKEN) {cost['pass']:.0f} ms; the pass with the probe's {tok['probe']} tokens in the same call
(PROBE and PROBE_MEAN, in `Embed` and in `Converse`, where the probe's rows are then cut from the cache)
{cost.get('pass+inline probe', float('nan')):.0f} ms; the pass then the probe as a second call (how `Converse` ran
the probe before it rode in the turn's call) {cost['pass+probe']:.0f} ms;
all-MiniLM-L6-v2 (numpy) {cost['minilm']:.0f} ms. The z-score is one subtract and
multiply per dimension, the whitening one 896 x 384 matrix-vector product, the
head two of those and a 768 x 768 one (no measurable time next to a model
call). The query input type adds {tok['query_prefix']} tokens to each query.

## Layers and transforms (exploration)

MRR@10, mean of python and rust, raw queries. `mean:L` is the mean over the text's
tokens of the residual stream after decoder layer L (0-based; `final` is the
final norm's output, what the server pools), `last:` the last token's,
`probe:` the probe's last token. Transforms from the background corpus: raw;
center (subtract the mean); zscore (per dimension); pcaK (PCA whitening, K components kept).

| vector | raw | center | zscore | pca128 | pca256 | pca512 |
|---|---|---|---|---|---|---|
{chr(10).join(layer_rows)}

{MARKER}
"""
    old = out.read_text() if out.exists() else ""
    if MARKER in old:
        text += old.split(MARKER, 1)[1].lstrip("\n")
    out.write_text(text)


if __name__ == "__main__":
    main()
