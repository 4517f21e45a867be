"""The embedding profile the model tool ships beside a model
(models/embedding_stats.py): written reproducibly, holding what it says, and
refused by the server when it does not fit the model."""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess

import numpy as np
import pytest
from conftest import BIN, MODELS, TINY, require

import embedding_stats as es


def test_statistics_are_reproducible_and_what_they_say(tmp_path):
    """A fresh run of the tool over the tiny model writes the installed file
    byte for byte; its metadata names the corpus, the head pairs and the
    probe by sha256; the z-score it stores is the background vectors' own
    mean and 1/std (recomputed here from the tool's pooled vectors)."""
    installed = require(TINY / "embedding_stats.safetensors")
    fresh = tmp_path / "stats.safetensors"
    es.write_stats(TINY, "tiny-random-qwen2", fresh)
    assert fresh.read_bytes() == installed.read_bytes(), "the statistics are not reproducible"

    meta, t = es.read_safetensors(fresh)
    assert meta["corpus_sha256"] == hashlib.sha256((MODELS / "background.jsonl").read_bytes()).hexdigest()
    assert meta["head_pairs_sha256"] == hashlib.sha256((MODELS / "head_pairs.jsonl").read_bytes()).hexdigest()
    probe = json.loads((MODELS / "templates.json").read_text())["probe"]
    assert meta["probe_sha256"] == hashlib.sha256(probe.encode()).hexdigest()
    assert (meta["model"], meta["hidden_size"], meta["format"]) == ("tiny-random-qwen2", "64", "2")

    from pooled import Qwen

    q = Qwen(TINY)
    vecs = q.embed(es.background_items(q.encode, q.chatml))["mean:final"].astype(np.float64)
    np.testing.assert_allclose(t["mean.mean"], vecs.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(t["mean.inv_std"], 1 / vecs.std(0), rtol=1e-4)
    assert t["mean.head"].shape == (64, 64)
    for pooling in ("mean", "last_token", "probe"):
        assert t[f"{pooling}.mean"].shape == (64,) and np.all(t[f"{pooling}.inv_std"] > 0)


@pytest.mark.parametrize("damage", ["missing", "other_model", "truncated"])
def test_server_refuses_a_bad_profile(tmp_path, damage):
    """A model directory whose statistics are missing, of another model, or
    cut short does not load: the server exits non-zero naming the file."""
    require(BIN)
    d = tmp_path / "m"
    d.mkdir()
    for f in ("model.onnx", "tokenizer.json", "config.json", "templates.json", "embedding_stats.safetensors"):
        shutil.copyfile(require(TINY / f), d / f)
    stats = d / "embedding_stats.safetensors"
    if damage == "missing":
        stats.unlink()
    elif damage == "other_model":
        cfg = json.loads((d / "config.json").read_text())
        cfg["name"] = "another-model"
        (d / "config.json").write_text(json.dumps(cfg))
    else:
        stats.write_bytes(stats.read_bytes()[:100])
    out = subprocess.run([str(BIN), "serve", "--model", str(d), "--addr", "127.0.0.1:0"], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "embedding_stats.safetensors" in out.stderr, out.stderr[-2000:]
