"""Background statistics of the model's pooled vectors, and the templates.

Raw decoder hidden states are anisotropic: a few outlier dimensions carry
most of every vector's norm, so raw cosines mostly compare those dimensions.
Standardising each vector with the mean and spread of vectors of the same
kind, computed once over a fixed background corpus, removes that common part.

The background corpus (models/background.jsonl) is fixed and versioned with
the repository: code and docstring sentences from the *fit* part of the
Python standard library (bench/quality/datasets.py's split by file; the
quality harness never evaluates on those files), and conversations assembled
from them. `make quality` rewrites it only with --write-background.
"""

from __future__ import annotations

import hashlib
import json
import random
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
BACKGROUND = HERE / "background.jsonl"
TEMPLATES = HERE / "templates.json"
STATS_FORMAT = 2
MAX_TOKENS = 512


@dataclass
class Transform:
    """y = (x - mean) @ proj (proj None: y = (x - mean) * scale)."""

    mean: np.ndarray
    scale: np.ndarray | None = None
    proj: np.ndarray | None = None

    @staticmethod
    def identity(h: int) -> "Transform":
        return Transform(np.zeros(h, np.float32), np.ones(h, np.float32))

    @staticmethod
    def center(b: np.ndarray) -> "Transform":
        return Transform(b.mean(0).astype(np.float32), np.ones(b.shape[1], np.float32))

    @staticmethod
    def zscore(b: np.ndarray) -> "Transform":
        b = b.astype(np.float64)
        sd = b.std(0)
        return Transform(b.mean(0).astype(np.float32), (1.0 / np.maximum(sd, 1e-6)).astype(np.float32))

    @staticmethod
    def pca_whiten(b: np.ndarray, k: int) -> "Transform":
        b = b.astype(np.float64)
        mu = b.mean(0)
        cov = np.cov((b - mu).T)
        s, u = np.linalg.eigh(cov)
        order = np.argsort(s)[::-1][:k]
        # A floor on the eigenvalues (1e-6 of the largest): components the
        # background barely spans are kept finite, not blown up.
        proj = u[:, order] / np.sqrt(np.maximum(s[order], 1e-6 * s.max()))
        # A deterministic sign per component (eigh's signs are arbitrary).
        signs = np.sign(proj[np.abs(proj).argmax(0), np.arange(proj.shape[1])])
        return Transform(mu.astype(np.float32), None, (proj * signs).astype(np.float32))

    def apply(self, x: np.ndarray) -> np.ndarray:
        c = x.astype(np.float32) - self.mean
        return c @ self.proj if self.proj is not None else c * self.scale


def load_templates(model_dir: Path | None = None) -> dict:
    path = model_dir / "templates.json" if model_dir and (model_dir / "templates.json").exists() else TEMPLATES
    return json.loads(path.read_text())


def write_background(sets: dict, n_docs: int = 400, n_queries: int = 400, n_conversations: int = 120) -> None:
    """models/background.jsonl from the fit part of the Python set."""
    import datasets  # bench/quality, on sys.path when called from the harness

    fit = [p for p in sets["python"] if p.part == "fit"]
    rng = random.Random(datasets.SEED + 7)
    rng.shuffle(fit)
    rows = [{"text": p.doc} for p in fit[:n_docs]] + [{"text": p.query} for p in fit[n_docs : n_docs + n_queries]]
    kinds = ["two_turn", "multi_turn", "long"]
    for i, p in enumerate(fit[n_docs + n_queries : n_docs + n_queries + n_conversations]):
        conv = datasets.conversations([datasets.Pair(p.query, p.doc, p.file, "eval")], kinds[i % 3], 1)[0]
        rows.append({"turns": [list(t) for t in conv.turns]})
    with open(BACKGROUND, "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"wrote {BACKGROUND}: {len(rows)} rows")


HEAD_PAIRS = HERE / "head_pairs.jsonl"


def write_head_pairs(sets: dict, n: int = 800) -> None:
    """models/head_pairs.jsonl: docstring -> code pairs from the fit part of
    the Python standard library, for the learned head (and its validation:
    a fifth of the files, by path hash)."""
    import datasets

    fit = sorted((p for p in sets["python"] if p.part == "fit"), key=lambda p: (p.file, p.query))
    random_ = random.Random(datasets.SEED + 11)
    random_.shuffle(fit)
    with open(HEAD_PAIRS, "w") as f:
        for p in fit[:n]:
            f.write(json.dumps({"query": p.query, "doc": p.doc, "file": p.file}, ensure_ascii=False) + "\n")
    print(f"wrote {HEAD_PAIRS}: {min(n, len(fit))} pairs")


def head_pairs() -> list[dict]:
    return [json.loads(line) for line in HEAD_PAIRS.read_text().splitlines() if line.strip()]


def background_rows() -> list[dict]:
    return [json.loads(line) for line in BACKGROUND.read_text().splitlines() if line.strip()]


def corpus_hash() -> str:
    return hashlib.sha256(BACKGROUND.read_bytes()).hexdigest()


def head_pairs_hash() -> str:
    return hashlib.sha256(HEAD_PAIRS.read_bytes()).hexdigest()


def background_items(encode, chatml) -> list[tuple[list[int], int, int]]:
    """(token ids, pooled span) per background row: raw texts as Embed
    tokenizes them, conversations as ChatML (the last turn pooled)."""
    items = []
    for r in background_rows():
        if "text" in r:
            ids = encode(r["text"])[:MAX_TOKENS]
            items.append((ids, 0, len(ids)))
        else:
            items.append(chatml([tuple(t) for t in r["turns"]]))
    return items


def read_safetensors(path: Path) -> tuple[dict[str, str], dict[str, np.ndarray]]:
    """The metadata and the tensors (F32, F16 or I64) of a safetensors file."""
    dtypes = {"F32": "<f4", "F16": "<f2", "I64": "<i8"}
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
        data = f.read()
    tensors = {}
    for name, meta in header.items():
        if name != "__metadata__":
            a, b = meta["data_offsets"]
            tensors[name] = np.frombuffer(data[a:b], dtype=dtypes[meta["dtype"]]).reshape(meta["shape"])
    return header.get("__metadata__", {}), tensors


def write_safetensors(path: Path, tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> None:
    """The safetensors format (8-byte header length, JSON header, raw
    little-endian data), written without a dependency, byte-reproducible:
    tensors in sorted name order."""
    header = {"__metadata__": metadata}
    blobs, offset = [], 0
    for name in sorted(tensors):
        a = np.ascontiguousarray(tensors[name], dtype="<f4")
        header[name] = {"dtype": "F32", "shape": list(a.shape), "data_offsets": [offset, offset + a.nbytes]}
        blobs.append(a.tobytes())
        offset += a.nbytes
    h = json.dumps(header, separators=(",", ":"), sort_keys=True).encode()
    h += b" " * (-len(h) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(h)))
        f.write(h)
        for blob in blobs:
            f.write(blob)


STATS_TOOL_VERSION = "1"
HEAD_RANK = 128
HEAD_STEPS = 300


def read_safetensors_metadata(path: Path) -> dict:
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n)).get("__metadata__", {})


def stats_metadata(name: str, hidden: int) -> dict[str, str]:
    probe = load_templates()["probe"]
    return {
        "format": str(STATS_FORMAT),
        "model": name,
        "hidden_size": str(hidden),
        "corpus_sha256": corpus_hash(),
        "head_pairs_sha256": head_pairs_hash(),
        "probe_sha256": hashlib.sha256(probe.encode()).hexdigest(),
        "tool_version": STATS_TOOL_VERSION,
        "layer": "final",
        "transform": "zscore,whiten,head",
    }


def write_stats(model_dir: Path, name: str, out: Path) -> dict[str, np.ndarray]:
    """Runs the background corpus through model_dir's model.onnx (f32) and
    writes the per-dimension mean and 1/std of each pooling to `out`:
    tensors {mean,last_token,probe}.{mean,inv_std}."""
    from pooled import Qwen

    q = Qwen(model_dir)
    items = background_items(q.encode, q.chatml)
    probe = q.encode(load_templates()["probe"])
    res = q.embed(items, probe)
    tensors = {}
    for pooling, key in (("mean", "mean:final"), ("last_token", "last:final"), ("probe", "probe:final")):
        t = Transform.zscore(res[key])
        tensors[f"{pooling}.mean"] = t.mean
        tensors[f"{pooling}.inv_std"] = t.scale
        # PCA whitening with every component, largest variance first (the
        # server keeps the first DEFAULT_WHITEN_COMPONENTS unless asked).
        w = Transform.pca_whiten(res[key], res[key].shape[1])
        tensors[f"{pooling}.whiten"] = w.proj
    tensors["mean.head"] = fit_head_on_pairs(q, Transform(tensors["mean.mean"], tensors["mean.inv_std"]))
    hidden = res["mean:final"].shape[1]
    write_safetensors(out, tensors, stats_metadata(name, hidden))
    return tensors


def head_vectors(q, z: Transform) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The head pairs' standardised MEAN vectors (queries, documents) and
    which pairs validate (a fifth of the files)."""
    pairs = head_pairs()
    qs = [(ids, 0, len(ids)) for ids in (q.encode(p["query"])[:MAX_TOKENS] for p in pairs)]
    ds = [(ids, 0, len(ids)) for ids in (q.encode(p["doc"])[:MAX_TOKENS] for p in pairs)]
    res = q.embed(qs + ds)["mean:final"]
    val = np.array([int(hashlib.sha256(p["file"].encode()).hexdigest(), 16) % 5 == 0 for p in pairs])
    return z.apply(res[: len(pairs)]), z.apply(res[len(pairs) :]), val


def fit_head_on_pairs(q, z: Transform, log=print) -> np.ndarray:
    """The learned head for MEAN z-scored vectors: fitted on the head pairs'
    training files, the step kept by the validation files' MRR@10."""
    qv, dv, val = head_vectors(q, z)
    w, score = fit_head(qv[~val], dv[~val], (qv[val], dv[val]), rank=HEAD_RANK, steps=HEAD_STEPS, log=log)
    log(f"learned head: validation MRR@10 {score:.4f} ({int(val.sum())} validation pairs)")
    return w


def ensure_profile(model_dir: Path, name: str, log=print) -> None:
    """templates.json and embedding_stats.safetensors in model_dir, the
    statistics recomputed when missing or made from another corpus, probe,
    format or model."""
    import shutil

    tpl = model_dir / "templates.json"
    if not tpl.exists() or tpl.read_bytes() != TEMPLATES.read_bytes():
        shutil.copyfile(TEMPLATES, tpl)
    stats = model_dir / "embedding_stats.safetensors"
    if stats.exists():
        have = read_safetensors_metadata(stats)
        want = stats_metadata(name, int(have.get("hidden_size", "0") or 0))
        if have == want:
            return
        stats.unlink()
    log(f"computing the embedding statistics over {len(background_rows())} background texts ({name})")
    tmp = stats.with_suffix(".tmp")
    write_stats(model_dir, name, tmp)
    tmp.replace(stats)


def fit_head(q: np.ndarray, d: np.ndarray, val: tuple[np.ndarray, np.ndarray] | None = None, rank: int = 128,
             steps: int = 300, lr: float = 1e-3, tau: float = 0.05, decay: float = 1e-3, seed: int = 0, log=None):
    """A learned linear head on standardised vectors: y = x + x @ A @ B
    (A: [h, rank], B: [rank, h], so W = I + AB starts at the identity), fitted
    with a symmetric InfoNCE loss over in-batch negatives (query i's positive
    is document i, every other document a negative) on L2-normalised y,
    full batch, Adam, L2 decay on A and B. Returns W [h, h] (the step with the
    best validation MRR@10 when `val` is given, else the last)."""
    rng = np.random.default_rng(seed)
    h = q.shape[1]
    a = (rng.standard_normal((h, rank)) * 0.01).astype(np.float64)
    b = np.zeros((rank, h))
    q, d = q.astype(np.float64), d.astype(np.float64)
    m = [np.zeros_like(a), np.zeros_like(b)]
    v = [np.zeros_like(a), np.zeros_like(b)]
    best = (-1.0, np.eye(h))

    def unit(x):
        n = np.linalg.norm(x, axis=1, keepdims=True)
        return x / n, n

    def mrr(w, qq, dd):
        uq, _ = unit(qq @ w)
        ud, _ = unit(dd @ w)
        s = uq @ ud.T
        rank_ = (s > np.diag(s)[:, None]).sum(1) + 1
        return float(np.where(rank_ <= 10, 1.0 / rank_, 0).mean())

    for step in range(steps + 1):
        w = np.eye(h) + a @ b
        if val is not None and step % 10 == 0:
            score = mrr(w, *val)
            if score > best[0]:
                best = (score, w.copy())
            if log and step % 50 == 0:
                log(f"head step {step}: validation MRR@10 {score:.4f}")
        if step == steps:
            break
        yq, yd = q @ w, d @ w
        uq, nq = unit(yq)
        ud, nd = unit(yd)
        s = uq @ ud.T / tau
        n = s.shape[0]
        p_row = np.exp(s - s.max(1, keepdims=True))
        p_row /= p_row.sum(1, keepdims=True)
        p_col = np.exp(s - s.max(0, keepdims=True))
        p_col /= p_col.sum(0, keepdims=True)
        ds = ((p_row - np.eye(n)) + (p_col - np.eye(n))) / (2 * n)
        duq = ds @ ud / tau
        dud = ds.T @ uq / tau
        dyq = (duq - uq * (uq * duq).sum(1, keepdims=True)) / nq
        dyd = (dud - ud * (ud * dud).sum(1, keepdims=True)) / nd
        dw = q.T @ dyq + d.T @ dyd
        grads = [dw @ b.T + decay * a, a.T @ dw + decay * b]
        for i, (p, g) in enumerate(zip((a, b), grads)):
            m[i] = 0.9 * m[i] + 0.1 * g
            v[i] = 0.999 * v[i] + 0.001 * g * g
            mh = m[i] / (1 - 0.9 ** (step + 1))
            vh = v[i] / (1 - 0.999 ** (step + 1))
            p -= lr * mh / (np.sqrt(vh) + 1e-8)
    if val is None:
        return (np.eye(h) + a @ b).astype(np.float32), None
    return best[1].astype(np.float32), best[0]
