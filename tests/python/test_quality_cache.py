"""The quality harness's cache of model outputs (bench/quality/run.py's
`Cached`), which the head's fit and every quality figure read: what it
returns is what the model computes for that probe, whether the probe ran
alone, beside others (`--also-probe`) or in parts, and a probe computed
beside another is found by a later run that asks for it."""

from __future__ import annotations

import sys

import numpy as np
from conftest import MODELS, TINY, require

sys.path.insert(0, str(MODELS.parent / "bench" / "quality"))


def test_cached_outputs_are_the_models_for_each_probe(tmp_path, monkeypatch):
    import run as harness  # noqa: PLC0415
    from pooled import Qwen, model_hash  # noqa: PLC0415

    require(TINY / "model.onnx")
    monkeypatch.setattr(harness, "CACHE", tmp_path)
    monkeypatch.setattr(harness, "CHUNK", 3)
    q = Qwen(TINY)
    texts = ["def f(x):\n    return x + 1", "a short one", "fn main() { println!(\"hi\"); }", "x", "the last text, a little longer than the others"]
    items = [(ids, 0, len(ids)) for ids in map(q.encode, texts)]
    served, short = q.encode('\nIn one sentence, the text above is about: "'), q.encode('\nTopic: "')

    cache = harness.Cached(q, model_hash(TINY), also=[short])
    got = cache.embed("set", items, served)
    want = q.embed(items, served)
    assert sorted(got) == sorted(want)
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-5, atol=1e-6, err_msg=k)
    runs = q.tokens

    # The probe computed beside it: read from the cache, no model call.
    later = harness.Cached(q, model_hash(TINY)).embed("set", items, short)
    assert q.tokens == runs, "a cached probe ran the model again"
    alone = q.embed(items, short)
    for k in alone:
        np.testing.assert_allclose(later[k], alone[k], rtol=1e-5, atol=1e-6, err_msg=k)
    # The control: the two probes' vectors differ.
    assert not np.allclose(later["probe:final"], got["probe:final"], atol=1e-3)
