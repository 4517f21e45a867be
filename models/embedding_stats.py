"""Background statistics of the model's pooled vectors, its learned head,
and its card (embedding.json: how the model embeds).

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
CARDS = HERE / "cards"
# The card of a base model (and the templates and probe every card shares
# unless it says otherwise).
BASE_CARD = CARDS / "base.json"
CARD_FILE = "embedding.json"
CARD_FORMAT = "1"
STATS_FORMAT = 3
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
    """The input types and probe: the model's card when model_dir has one,
    else the base card's."""
    path = model_dir / CARD_FILE if model_dir and (model_dir / CARD_FILE).exists() else BASE_CARD
    card = json.loads(path.read_text())
    return {"input_types": card["input_types"], "probe": card["probe"]}


def base_card() -> dict:
    return json.loads(BASE_CARD.read_text())


def card_file(name: str, card: dict, source: str) -> dict:
    """The card as the server reads it (src/model/card.rs)."""
    keys = ("pooling", "end_token", "normalize", "dimensions", "input_types", "probe")
    out = {"format": CARD_FORMAT, "model": name, "source": source}
    out.update({k: card[k] for k in keys if card.get(k) is not None})
    return out


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
# Where prepared heads are shipped, by model name (see write_head).
HEADS = HERE / "heads"

# The head pairs: per set, how many fit-part pairs or conversations.
HEAD_PAIR_COUNTS = {"python": 1800, "rust": 6000, "conv_two_turn": 600, "conv_multi_turn": 600, "conv_long": 200}


def write_head_pairs(sets: dict) -> None:
    """models/head_pairs.jsonl: the pairs the learned head is fitted on, all
    from the fit part (bench/quality/datasets.py's split by file; the quality
    harness scores only the other part): docstring -> code pairs of the
    Python standard library and of the cargo registry's crates, and
    docstring -> conversation pairs (the harness's conversation kinds over
    fit-part functions). A fifth of each set's files (by path hash)
    validates the fit."""
    import datasets  # bench/quality, on sys.path when called from the harness

    rows = []
    for name, n in HEAD_PAIR_COUNTS.items():
        if name.startswith("conv_"):
            for c in datasets.conversations(sets["python"], name[5:], n, part="fit"):
                rows.append({"set": name, "query": c.query, "turns": [list(t) for t in c.turns], "file": c.file})
        else:
            for p in datasets.sample(sets[name], "fit", n):
                rows.append({"set": name, "query": p.query, "doc": p.doc, "file": p.file})
    with open(HEAD_PAIRS, "w") as f:
        for r in rows:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    print(f"wrote {HEAD_PAIRS}: {len(rows)} pairs")


def head_pairs(limit: int | None = None) -> list[dict]:
    """The head pairs, the first `limit` of each set if given."""
    rows = [json.loads(line) for line in HEAD_PAIRS.read_text().splitlines() if line.strip()]
    if limit is None:
        return rows
    taken: dict[str, int] = {}
    kept = []
    for r in rows:
        if taken.get(r["set"], 0) < limit:
            taken[r["set"]] = taken.get(r["set"], 0) + 1
            kept.append(r)
    return kept


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


STATS_TOOL_VERSION = "2"
HEAD_FORMAT = 1
HEAD_TOOL_VERSION = "1"
# Whitened components of each of the head's two input vectors.
HEAD_COMPONENTS = 384
# The fit (fit_head): Adam steps, learning rate, batch, temperature.
HEAD_STEPS = 6000
HEAD_LR = 2e-5
HEAD_BATCH = 256
HEAD_TAU = 0.05


def read_safetensors_metadata(path: Path) -> dict:
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n)).get("__metadata__", {})


def probe_text(model_dir: Path | None = None) -> str:
    """The probe of model_dir's card (the base card's without one)."""
    return load_templates(model_dir)["probe"]


def stats_metadata(name: str, hidden: int, probe: str) -> dict[str, str]:
    return {
        "format": str(STATS_FORMAT),
        "model": name,
        "hidden_size": str(hidden),
        "corpus_sha256": corpus_hash(),
        "probe_sha256": hashlib.sha256(probe.encode()).hexdigest(),
        "tool_version": STATS_TOOL_VERSION,
        "layer": "final",
        "transform": "zscore,whiten",
    }


def background_vectors(q, probe: str) -> dict[str, np.ndarray]:
    """The background corpus's pooled vectors through the model `q` (a
    pooled.Qwen) with `probe`: {"mean:final", "last:final", "probe:final"} -> [n, hidden]."""
    return q.embed(background_items(q.encode, q.chatml), q.encode(probe))


def write_stats(model_dir: Path, name: str, out: Path, background: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Writes the background statistics of model_dir's model.onnx (f32) to
    `out`, with the probe of model_dir's card: per pooling
    {mean,last_token,probe}, the per-dimension mean and 1/std and the full
    PCA whitening (896 x 896, largest variance first; the server keeps 384
    components unless asked)."""
    probe = probe_text(model_dir)
    if background is None:
        from pooled import Qwen

        background = background_vectors(Qwen(model_dir), probe)
    tensors = {}
    for pooling, key in (("mean", "mean:final"), ("last_token", "last:final"), ("probe", "probe:final")):
        t = Transform.zscore(background[key])
        tensors[f"{pooling}.mean"] = t.mean
        tensors[f"{pooling}.inv_std"] = t.scale
        tensors[f"{pooling}.whiten"] = Transform.pca_whiten(background[key], background[key].shape[1]).proj
    hidden = background["mean:final"].shape[1]
    write_safetensors(out, tensors, stats_metadata(name, hidden, probe))
    return tensors


# ---------------------------------------------------------------- the head
#
# The learned head of POOLING_PROBE_MEAN: x = [unit(whiten_p(probe)),
# unit(whiten_m(mean))] (each vector PCA-whitened with the background's
# statistics, HEAD_COMPONENTS kept, L2-normalised), y = x @ H. H starts at
# the identity (the training-free side-by-side vector) and is fitted with a
# symmetric InfoNCE loss (in-batch negatives, one set per batch) on the head
# pairs' training files; the step with the best MRR@10 on their validation
# files (a fifth, by path hash) is kept; then its output is rotated onto its
# principal axes over the background (largest variance first), which leaves
# every cosine as it is and makes truncation keep the most telling
# components. The file carries the whitening it was fitted with, so it is
# self-contained: the server applies exactly what was fitted.


def head_metadata(name: str, hidden: int, probe: str) -> dict[str, str]:
    return {
        "format": str(HEAD_FORMAT),
        "model": name,
        "hidden_size": str(hidden),
        "probe": probe,
        "pairs_sha256": head_pairs_hash(),
        "tool_version": HEAD_TOOL_VERSION,
        "components": str(HEAD_COMPONENTS),
        # Its mean part was fitted on the conversation's mean (a Converse
        # stream's default, MEAN_OVER_CONVERSATION; a single text's is its own).
        "mean_over": "conversation",
    }


def head_matches(path: Path, name: str, probe: str) -> bool:
    """Whether the head file at `path` was fitted for this model, probe,
    pairs and tool version (its hidden size is checked by the server)."""
    if not path.exists():
        return False
    have = read_safetensors_metadata(path)
    want = head_metadata(name, int(have.get("hidden_size", "0") or 0), probe)
    return all(have.get(k) == v for k, v in want.items())


def head_items(encode, chatml, rows: list[dict]) -> dict[str, tuple[list, list]]:
    """Per set, the (query items, document items) of the head pairs, as the
    server tokenises them (raw texts; conversations as ChatML, the last
    turn's text pooled); documents cut at MAX_TOKENS like the background."""
    out: dict[str, tuple[list, list]] = {}
    for r in rows:
        qs, ds = out.setdefault(r["set"], ([], []))
        ids = encode(r["query"])[:MAX_TOKENS]
        qs.append((ids, 0, len(ids)))
        if "turns" in r:
            ds.append(chatml([tuple(t) for t in r["turns"]]))
        else:
            ids = encode(r["doc"])[:MAX_TOKENS]
            ds.append((ids, 0, len(ids)))
    return out


def validation_files(files: list[str]) -> np.ndarray:
    return np.array([int(hashlib.sha256(f.encode()).hexdigest(), 16) % 5 == 0 for f in files])


class HeadInput:
    """The head's input from pooled vectors: each part whitened (from the
    background vectors), HEAD_COMPONENTS kept, L2-normalised, side by side.
    `mean_key` "convmean" takes the conversation's mean for the mean part
    (MEAN_OVER_CONVERSATION; a single text's is its own mean)."""

    def __init__(self, background: dict[str, np.ndarray], k: int = HEAD_COMPONENTS, mean_key: str = "mean"):
        self.keys = {"probe": "probe", "mean": mean_key}
        self.parts = {part: Transform.pca_whiten(background[f"{key}:final"], k) for part, key in self.keys.items()}

    def __call__(self, v: dict[str, np.ndarray]) -> np.ndarray:
        out = []
        for part, t in self.parts.items():
            x = t.apply(v[f"{self.keys[part]}:final"]).astype(np.float64)
            out.append(x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12))
        return np.concatenate(out, 1)


def write_head(name: str, out: Path, background: dict[str, np.ndarray], embed, limit: int | None = None, log=print) -> dict:
    """Fits the head on models/head_pairs.jsonl and writes it to `out`.
    `embed(set_name, items)` gives the pooled vectors of items (as
    pooled.Qwen.embed with the probe `embed.probe_text`, which the head's
    metadata names); `limit` caps the pairs per set (the tiny test model's
    quick fit). The mean part is the conversation's mean (a conversation's
    every plain token; a single text's own mean): what a Converse stream
    pools by default, and what Embed pools for its one text. Returns the
    fit's summary."""
    rows = head_pairs(limit)
    x = HeadInput(background, mean_key="convmean")
    groups, val = [], []
    files_by_set: dict[str, list[str]] = {}
    for r in rows:
        files_by_set.setdefault(r["set"], []).append(r["file"])
    sizes = {}
    for set_name, (qs, ds) in embed_sets(embed, rows).items():
        xq, xd = x(qs), x(ds)
        v = validation_files(files_by_set[set_name])
        groups.append((xq[~v], xd[~v]))
        val.append((xq[v], xd[v]))
        sizes[set_name] = (int((~v).sum()), int(v.sum()))
    w, score, step = fit_head(groups, val, log=log)
    # Rotate the output onto its principal axes over the background.
    y = x(background) @ w
    y = y - y.mean(0)
    s, u = np.linalg.eigh(y.T @ y)
    u = u[:, np.argsort(s)[::-1]]
    u *= np.sign(u[np.abs(u).argmax(0), np.arange(u.shape[1])])
    head = w @ u
    hidden = background["mean:final"].shape[1]
    tensors = {"head": head.astype(np.float32)}
    for key, t in x.parts.items():
        tensors[f"{key}.mean"] = t.mean
        tensors[f"{key}.proj"] = t.proj
    meta = head_metadata(name, hidden, embed.probe_text)
    meta["fit"] = json.dumps({"validation_mrr10": round(score, 4), "step": step, "pairs": sizes}, sort_keys=True)
    write_safetensors(out, tensors, meta)
    log(f"learned head: validation MRR@10 {score:.4f} at step {step} ({sum(a + b for a, b in sizes.values())} pairs)")
    return {"validation_mrr10": score, "step": step, "pairs": sizes}


def embed_sets(embed, rows: list[dict]) -> dict[str, tuple[dict, dict]]:
    """Per set, the pooled vectors of its queries and its documents."""
    out = {}
    for set_name, (qs, ds) in embed.items_by_set(rows).items():
        out[set_name] = (embed(f"head-{set_name}-q", qs), embed(f"head-{set_name}-d", ds))
    return out


class QwenEmbed:
    """embed(name, items) for write_head over a pooled.Qwen (no cache)."""

    def __init__(self, q, probe: str):
        self.q, self.probe_text, self.probe = q, probe, q.encode(probe)

    def items_by_set(self, rows):
        return head_items(self.q.encode, self.q.chatml, rows)

    def __call__(self, name, items):
        return self.q.embed(items, self.probe)


def write_card(model_dir: Path, card: dict) -> None:
    """embedding.json in model_dir, rewritten (atomically, a new file) only
    when it says something else."""
    path = model_dir / CARD_FILE
    text = json.dumps(card, indent=1, ensure_ascii=False) + "\n"
    if path.exists() and path.read_text() == text:
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    tmp.replace(path)


def ensure_profile(model_dir: Path, name: str, log=print, head_limit: int | None = None,
                   card: dict | None = None, source: str = "models/cards/base.json") -> None:
    """embedding.json (the card: `card`, the base card when None),
    embedding_stats.safetensors and, for a card whose pooling is
    probe_mean, embedding_head.safetensors in model_dir. The statistics are
    recomputed when missing or made from another corpus, probe, format or
    model; the head is taken from models/heads/<name>.safetensors when one is
    shipped for this model, probe, pairs and tool version, and fitted here
    otherwise (head_limit caps the pairs per set). An embedding-tuned model
    (another pooling) has its own vector and gets no head fitted."""
    import shutil

    card = base_card() if card is None else card
    write_card(model_dir, card_file(name, card, source))
    probe = probe_text(model_dir)
    needs_head = card["pooling"] == "probe_mean"
    stats = model_dir / "embedding_stats.safetensors"
    if stats.exists():
        have = read_safetensors_metadata(stats)
        if have != stats_metadata(name, int(have.get("hidden_size", "0") or 0), probe):
            stats.unlink()
    head = model_dir / "embedding_head.safetensors"
    shipped = HEADS / f"{name}.safetensors"
    if head_matches(shipped, name, probe):
        if not head.exists() or head.read_bytes() != shipped.read_bytes():
            log(f"installing the learned head shipped in {shipped.relative_to(HERE.parent)}")
            shutil.copyfile(shipped, head)
    elif head.exists() and not head_matches(head, name, probe):
        head.unlink()
    if stats.exists() and (head.exists() or not needs_head):
        return
    from pooled import Qwen

    q = Qwen(model_dir)
    log(f"computing the background vectors: {len(background_rows())} texts ({name})")
    background = background_vectors(q, probe)
    if not stats.exists():
        tmp = stats.with_suffix(".tmp")
        write_stats(model_dir, name, tmp, background)
        tmp.replace(stats)
    if needs_head and not head.exists():
        n = len(head_pairs()) if head_limit is None else head_limit * len(HEAD_PAIR_COUNTS)
        log(f"fitting the learned head on up to {n} pairs ({name}; no head is shipped for it)")
        tmp = head.with_suffix(".tmp")
        write_head(name, tmp, background, QwenEmbed(q, probe), head_limit, log)
        tmp.replace(head)


def unit(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    n = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(n, 1e-12), n


def mrr10(q: np.ndarray, d: np.ndarray) -> float:
    """MRR@10 of queries q against documents d (row i's answer is row i),
    ties counted against the answer."""
    uq, _ = unit(q)
    ud, _ = unit(d)
    s = uq @ ud.T
    rank = (s >= np.diag(s)[:, None]).sum(1)
    return float(np.where(rank <= 10, 1.0 / rank, 0).mean())


def fit_head(groups: list[tuple[np.ndarray, np.ndarray]], val: list[tuple[np.ndarray, np.ndarray]], steps: int = HEAD_STEPS,
             lr: float = HEAD_LR, batch: int = HEAD_BATCH, tau: float = HEAD_TAU, seed: int = 0, every: int = 50, log=None):
    """A linear map W [d, d] from the identity, fitted with a symmetric
    InfoNCE loss (query i's positive is document i, the batch's other
    documents its negatives, and the other way round) on L2-normalised
    outputs, Adam, mini-batches drawn from one group at a time (in
    proportion to the groups' sizes). Returns (W, validation MRR@10, step)
    of the step with the best mean validation MRR@10 over `val` (checked
    every `every` steps; step 0 is the identity)."""
    rng = np.random.default_rng(seed)
    d = groups[0][0].shape[1]
    w = np.eye(d)
    m, v = np.zeros_like(w), np.zeros_like(w)
    sizes = np.array([len(g[0]) for g in groups], float)

    def score(w):
        return float(np.mean([mrr10(a @ w, b @ w) for a, b in val if len(a)]))

    best = (score(w), w.copy(), 0)
    for step in range(1, steps + 1):
        xq, xd = groups[rng.choice(len(groups), p=sizes / sizes.sum())]
        idx = rng.choice(len(xq), size=min(batch, len(xq)), replace=False)
        q, dd = xq[idx], xd[idx]
        uq, nq = unit(q @ w)
        ud, nd = unit(dd @ w)
        s = uq @ ud.T / tau
        n = len(idx)
        p_row = np.exp(s - s.max(1, keepdims=True))
        p_row /= p_row.sum(1, keepdims=True)
        p_col = np.exp(s - s.max(0, keepdims=True))
        p_col /= p_col.sum(0, keepdims=True)
        ds = ((p_row - np.eye(n)) + (p_col - np.eye(n))) / (2 * n)
        duq = ds @ ud / tau
        dud = ds.T @ uq / tau
        dyq = (duq - uq * (uq * duq).sum(1, keepdims=True)) / nq
        dyd = (dud - ud * (ud * dud).sum(1, keepdims=True)) / nd
        g = q.T @ dyq + dd.T @ dyd
        m = 0.9 * m + 0.1 * g
        v = 0.999 * v + 0.001 * g * g
        w -= lr * (m / (1 - 0.9**step)) / (np.sqrt(v / (1 - 0.999**step)) + 1e-8)
        if step % every == 0:
            sc = score(w)
            if sc > best[0]:
                best = (sc, w.copy(), step)
            if log and step % (every * 20) == 0:
                log(f"head step {step}: validation MRR@10 {sc:.4f} (best {best[0]:.4f} at {best[2]})")
    return best[1], best[0], best[2]
