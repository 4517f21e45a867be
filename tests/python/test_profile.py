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
    byte for byte; its metadata names the corpus and the probe by sha256;
    the z-score it stores is the background vectors' own mean and 1/std
    (recomputed here from the tool's pooled vectors)."""
    installed = require(TINY / "embedding_stats.safetensors")
    fresh = tmp_path / "stats.safetensors"
    es.write_stats(TINY, "tiny-random-qwen2", fresh)
    assert fresh.read_bytes() == installed.read_bytes(), "the statistics are not reproducible"

    meta, t = es.read_safetensors(fresh)
    assert meta["corpus_sha256"] == hashlib.sha256((MODELS / "background.jsonl").read_bytes()).hexdigest()
    probe = json.loads((MODELS / "cards" / "base.json").read_text())["probe"]
    assert meta["probe_sha256"] == hashlib.sha256(probe.encode()).hexdigest()
    assert (meta["model"], meta["hidden_size"], meta["format"]) == ("tiny-random-qwen2", "64", "3")

    from pooled import Qwen

    q = Qwen(TINY)
    vecs = q.embed(es.background_items(q.encode, q.chatml))["mean:final"].astype(np.float64)
    np.testing.assert_allclose(t["mean.mean"], vecs.mean(0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(t["mean.inv_std"], 1 / vecs.std(0), rtol=1e-4)
    for pooling in ("mean", "last_token", "probe"):
        assert t[f"{pooling}.mean"].shape == (64,) and np.all(t[f"{pooling}.inv_std"] > 0)
        assert t[f"{pooling}.whiten"].shape == (64, 64)


def test_head_is_reproducible_and_what_it_says(tmp_path):
    """A fresh fit over the tiny model writes the installed head byte for
    byte. Its metadata names the probe, the pairs (sha256) and the mean it
    takes (the conversation's: a conversation's every plain token, a single
    text's own mean); its whitening is the background's PCA whitening of the
    probe and of the conversation means; its matrix, applied as the server
    applies it, ranks the validation pairs at least as well as the
    identity it starts from (the fit keeps its best validation step), and
    its outputs come ordered by their variance over the background."""
    import prepare
    from pooled import Qwen

    installed = require(TINY / "embedding_head.safetensors")
    q = Qwen(TINY)
    probe = json.loads((MODELS / "cards" / "base.json").read_text())["probe"]
    background = es.background_vectors(q, probe)
    fresh = tmp_path / "head.safetensors"
    summary = es.write_head("tiny-random-qwen2", fresh, background, es.QwenEmbed(q, probe), prepare.TINY_HEAD_PAIRS, log=lambda _: None)
    assert fresh.read_bytes() == installed.read_bytes(), "the head is not reproducible"

    meta, t = es.read_safetensors(fresh)
    assert meta["probe"] == probe
    assert meta["pairs_sha256"] == hashlib.sha256((MODELS / "head_pairs.jsonl").read_bytes()).hexdigest()
    assert (meta["model"], meta["hidden_size"], meta["format"]) == ("tiny-random-qwen2", "64", "1")
    assert meta["mean_over"] == "conversation"
    pooled = {"probe": "probe", "mean": "convmean"}
    for key in ("probe", "mean"):
        want = es.Transform.pca_whiten(background[f"{pooled[key]}:final"], es.HEAD_COMPONENTS)
        np.testing.assert_allclose(t[f"{key}.mean"], want.mean, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(t[f"{key}.proj"], want.proj, rtol=1e-5, atol=1e-6)
    assert t["head"].shape == (128, 128)
    fit = json.loads(meta["fit"])
    assert fit["step"] == summary["step"] and 0 <= fit["step"] <= es.HEAD_STEPS, fit

    def apply(v):
        x = np.concatenate([es.unit((v[f"{pooled[k]}:final"] - t[f"{k}.mean"]) @ t[f"{k}.proj"])[0] for k in ("probe", "mean")], 1)
        return x, x @ t["head"]

    x, y = apply(background)
    var = (y - y.mean(0)).var(0)
    assert np.all(np.diff(var) <= 1e-6 * var[0]), "components ordered by background variance"
    # The validation pairs, as the fit split them: the head does no worse than the identity.
    rows = es.head_pairs(prepare.TINY_HEAD_PAIRS)
    assert sum(a + b for a, b in fit["pairs"].values()) == len(rows), "every pair fitted or validated"
    vecs = es.embed_sets(es.QwenEmbed(q, probe), rows)
    files = {}
    for r in rows:
        files.setdefault(r["set"], []).append(r["file"])
    head_scores, identity_scores = [], []
    for name, (qv, dv) in vecs.items():
        val = es.validation_files(files[name])
        (xq, yq), (xd, yd) = apply(qv), apply(dv)
        head_scores.append(es.mrr10(yq[val], yd[val]))
        identity_scores.append(es.mrr10(xq[val], xd[val]))
    assert np.mean(head_scores) >= np.mean(identity_scores) - 1e-9, (head_scores, identity_scores)


def test_the_shipped_head_is_current():
    """The head shipped for the real model (models/heads/) was fitted on the
    current head pairs, with the current probe and tool version: otherwise
    `make models` would fit one here instead (about an hour on 2 cores)."""
    import prepare

    shipped = MODELS / "heads" / f"{prepare.REAL_NAME}.safetensors"
    assert shipped.exists(), shipped
    assert es.head_matches(shipped, prepare.REAL_NAME, es.probe_text()), es.read_safetensors_metadata(shipped)


@pytest.mark.parametrize(
    ("file", "damage"),
    [
        ("embedding_stats.safetensors", "missing"),
        ("embedding_stats.safetensors", "other_model"),
        ("embedding_stats.safetensors", "truncated"),
        ("embedding_head.safetensors", "missing"),
        ("embedding_head.safetensors", "truncated"),
        ("embedding_head.safetensors", "other_probe"),
        ("embedding.json", "missing"),
        ("embedding.json", "truncated"),
    ],
)
def test_server_refuses_a_bad_profile(tmp_path, file, damage):
    """A model directory whose card, statistics or head are missing, of another
    model, cut short, or (the head) fitted with another probe does not
    load: the server exits non-zero naming the file, never serving raw or
    wrongly transformed vectors."""
    require(BIN)
    d = tmp_path / "m"
    d.mkdir()
    for f in ("model.onnx", "tokenizer.json", "config.json", "embedding.json", "embedding_stats.safetensors", "embedding_head.safetensors"):
        shutil.copyfile(require(TINY / f), d / f)
    target = d / file
    if damage == "missing":
        target.unlink()
    elif damage == "other_model":
        cfg = json.loads((d / "config.json").read_text())
        cfg["name"] = "another-model"
        (d / "config.json").write_text(json.dumps(cfg))
        card = json.loads((d / "embedding.json").read_text())
        card["model"] = "another-model"  # the card follows: the statistics must be what fails
        (d / "embedding.json").write_text(json.dumps(card))
    elif damage == "other_probe":
        tpl = json.loads((d / "embedding.json").read_text())
        tpl["probe"] = "\nAnother probe: \""
        (d / "embedding.json").write_text(json.dumps(tpl))
    else:
        target.write_bytes(target.read_bytes()[:100])
    out = subprocess.run([str(BIN), "serve", "--model", str(d), "--addr", "127.0.0.1:0"], capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert file in out.stderr, out.stderr[-2000:]
    if damage == "other_probe":
        assert "fitted with the probe" in out.stderr, out.stderr[-2000:]
