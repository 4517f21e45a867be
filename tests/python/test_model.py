"""The prepared models themselves, run with Python onnxruntime: the converted
real model generates code, chunked prefill agrees with one-shot, left-padded
batches are right, the tokenizer is Qwen's, and `prepare.py import` adopts a
logits-only export."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from conftest import BIN, MODELS, REAL, ROOT, TINY, require
from tokenizers import Tokenizer

# What each tolerance rests on. ONNX Runtime (MLAS) picks CPU kernels by CPU
# features and by call shape, so no bound here may rest on one machine's 0.0.
#
# f32 and fp16 (float32 arithmetic; fp16 stores weights and KV in float16):
# chunking changes no arithmetic, by construction. The weight MatMuls run on
# prepacked weights, which MLAS multiplies with one kernel whatever the row
# count (its M=1 shortcut exists only for unpacked B), each output summed over
# K in the same order; the attention MatMuls have 7 * s rows (the query heads
# of a KV head stacked), never 1, and their K blocks start at position 0; and
# masked positions add exact zeros. Measured 0.0 at 60 and 700 tokens, chunks
# of 1 to 300, on AVX-512 (Intel Sapphire Rapids, and AMD EPYC before it) and
# on AVX2/FMA3 kernels (an AVX2-only AMD EPYC Zen 3, emulated: `make
# test-avx2`). The bounds are margins, not 0.0, for kernels nobody has seen:
# a few float32 ulps of the largest hidden values (~136), one fp16 ulp for fp16.
EXACT = {
    "model.onnx": 1e-4,
    "model_fp16.onnx": 1e-2,
}
# q4, q8 and int8 quantise activations to int8 per call (MatMulNBits at
# accuracy level 4 per block; dynamic int8 per tensor) with kernels chosen by
# CPU features (VNNI or not) and row count, so chunking changes their numbers
# on some CPUs and not others (q4 chunking is exact on AVX-512 VNNI, off by 1.7
# on AVX2 Zen 3). What holds everywhere is the direction: the mean-pooled
# cosine between one-shot and chunked runs. Bounds = the worst of AVX-512
# (native) and AVX2 (emulated Zen 3) measurements, with margin:
# The bounds can fail, and test_quantised_chunking shows it on every run:
# two broken two-chunk runs (the second chunk without the first's cache;
# positions restarted at 0), compared on the second chunk's rows, must fall
# below each bound (measured 0.868 and 0.875 in q8, 0.856 and 0.854 in q4,
# 0.880 and 0.800 in int8; Intel Xeon AVX-512 VNNI, 2026-12-03).
#   variant  two-chunk / token-by-token cosine measured (worst CPU)  bound
PER_CALL_QUANTISED = {
    "model_q4.onnx": 0.999,  # 1.0 / 1.0 AVX-512;  1.0 / 0.99998 AVX2 (max abs 0.0 / 1.73)
    "model_q8.onnx": 0.999,  # 0.99999 / 0.99994 AVX-512
    "model_int8.onnx": 0.96,  # 0.9904 / 0.9930 AVX-512; AVX2 (no VNNI) sums u8*s8 pairs in
    # saturating 16 bits, which per-call scales move: margin ~6x, still above a broken run's 0.950
}


def session(path):
    so = ort.SessionOptions()
    so.intra_op_num_threads = 2
    so.log_severity_level = 3
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def kv_type(sess):
    t = next(i.type for i in sess.get_inputs() if i.name == "past_key_values.0.key")
    return np.float16 if "float16" in t else np.float32


def run(sess, ids, past=None, mask=None, positions=None):
    """One call; returns (last_hidden_state, [present...])."""
    ids = np.atleast_2d(np.asarray(ids, dtype=np.int64))
    b, s = ids.shape
    layers = sum(1 for i in sess.get_inputs() if i.name.endswith(".key"))
    kv = next(i for i in sess.get_inputs() if i.name == "past_key_values.0.key").shape
    p = 0 if past is None else past[0].shape[2]
    feed = {
        "input_ids": ids,
        "attention_mask": np.ones((b, p + s), np.int64) if mask is None else mask,
        "position_ids": np.broadcast_to(np.arange(p, p + s, dtype=np.int64), (b, s)).copy() if positions is None else positions,
    }
    for i in range(layers):
        for j, kind in enumerate(("key", "value")):
            feed[f"past_key_values.{i}.{kind}"] = (
                np.zeros((b, kv[1], 0, kv[3]), kv_type(sess)) if past is None else past[2 * i + j]
            )
    out = sess.run(None, feed)
    names = [o.name for o in sess.get_outputs()]
    hidden = out[names.index("last_hidden_state")]
    present = [out[names.index(n)] for n in names if n.startswith("present.")]
    return hidden, present


@pytest.fixture(scope="module")
def tokenizer():
    return Tokenizer.from_file(str(require(REAL / "tokenizer.json")))


@pytest.fixture(scope="module")
def sixty(tokenizer):
    text = (
        "def merge_sorted(a, b):\n    out = []\n    i = j = 0\n    while i < len(a) and j < len(b):\n"
        "        if a[i] <= b[j]:\n            out.append(a[i]); i += 1\n        else:\n"
        "            out.append(b[j]); j += 1\n    return out + a[i:] + b[j:]\n"
    )
    ids = tokenizer.encode(text).ids[:60]
    assert len(ids) == 60
    return ids


def test_tokenizer_is_qwens(tokenizer):
    """'Hello world' is [9707, 1879]; ChatML markers are single ids; code, unicode and emoji round-trip."""
    assert tokenizer.encode("Hello world").ids == [9707, 1879]
    for marker, id_ in [("<|endoftext|>", 151643), ("<|im_start|>", 151644), ("<|im_end|>", 151645), ("<|fim_prefix|>", 151659)]:
        assert tokenizer.encode(marker).ids == [id_]
        assert tokenizer.token_to_id(marker) == id_
    assert tokenizer.encode("<|im_start|>user\nhi<|im_end|>").ids == [151644, 872, 198, 6023, 151645]
    for sample in [
        "fn main() {\n\tprintln!(\"{}\", 1 + 2);\n}\n",
        "Ünïcödé — naïve café, 日本語, עברית, Ελληνικά",
        "emoji 🦀🐍👩‍💻 and flags 🇫🇷",
        "   leading spaces and trailing   \n\n",
        "1234567890 3.14159",
    ]:
        assert tokenizer.decode(tokenizer.encode(sample).ids, skip_special_tokens=False) == sample
    # Digits are split one by one, as Qwen2's pre-tokenizer does.
    assert len(tokenizer.encode("1234").ids) == 4


def test_real_model_generates_code(tokenizer):
    """Greedy decoding with the KV-cache loop answers the ChatML prompt with a Python function."""
    from gguf_source import GgufSource  # noqa: PLC0415

    sess = session(require(REAL / "model.onnx"))
    gguf = subprocess.run(
        [sys.executable, str(MODELS / "prepare.py"), "gguf-path"], check=True, capture_output=True, text=True
    ).stdout.strip()
    lm_head = GgufSource(gguf).tensor("output.weight")
    prompt = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
        "<|im_start|>user\nWrite a Python function that returns the sum of a list.<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    hidden, past = run(sess, tokenizer.encode(prompt).ids)
    out = []
    for _ in range(160):
        nxt = int(np.argmax(hidden[0, -1] @ lm_head.T))
        if nxt == tokenizer.token_to_id("<|im_end|>"):
            break
        out.append(nxt)
        text = tokenizer.decode(out)
        if "def " in text and "\n    return " in text.split("def ", 1)[1] and text.endswith("\n"):
            break
        hidden, past = run(sess, [nxt], past)
    text = tokenizer.decode(out)
    print(f"\n--- generated ---\n{text}\n---")
    assert "def " in text and "return" in text


def three_ways(sess, ids):
    """Hidden states and present KV of one-shot, two-chunk (25 + rest) and token-by-token runs."""
    h1, p1 = run(sess, ids)
    ha, pa = run(sess, ids[:25])
    hb, pb_ = run(sess, ids[25:], pa)
    past, rows = None, []
    for t in ids:
        h, past = run(sess, [t], past)
        rows.append(h)
    return (h1, p1), (np.concatenate([ha, hb], axis=1), pb_), (np.concatenate(rows, axis=1), past)


@pytest.mark.parametrize("variant", sorted(EXACT))
def test_chunking_agrees(variant, sixty):
    """One-shot, two-chunk and token-by-token runs of the same 60 tokens agree on hidden states and present KV."""
    tol = EXACT[variant]
    (h1, p1), (h2, p2), (h3, p3) = three_ways(session(require(REAL / variant)), sixty)
    diff = lambda a, b: float(np.abs(a.astype(np.float32) - b.astype(np.float32)).max())  # noqa: E731
    diffs = {
        "two-chunk hidden": diff(h1, h2),
        "token-by-token hidden": diff(h1, h3),
        "two-chunk present": max(diff(a, b) for a, b in zip(p1, p2)),
        "token-by-token present": max(diff(a, b) for a, b in zip(p1, p3)),
    }
    print(f"\n{variant}: " + ", ".join(f"{k} {v:.2e}" for k, v in diffs.items()))
    for what, d in diffs.items():
        assert d <= tol, f"{variant}: {what} differs by {d} (> {tol})"


@pytest.mark.parametrize("variant", sorted(PER_CALL_QUANTISED))
def test_quantised_chunking(variant, sixty):
    """Variants that quantise activations per call keep the direction under
    chunking: the mean-pooled hidden state of two-chunk and token-by-token runs
    stays within the stated cosine of the one-shot run's, on any CPU; and two
    broken two-chunk runs (the second chunk without the first's cache, its
    positions restarted at 0) fall below the same bound on that variant."""
    sess = session(require(REAL / variant))
    (h1, _), (h2, _), (h3, _) = three_ways(sess, sixty)
    _, first = run(sess, sixty[:25])
    no_cache, _ = run(sess, sixty[25:])
    restarted, _ = run(sess, sixty[25:], first, positions=np.arange(len(sixty) - 25, dtype=np.int64)[None, :])
    tail = lambda h: h[0, -(len(sixty) - 25):].astype(np.float32).mean(0)  # noqa: E731
    cos = lambda a, b: float(a @ b / np.linalg.norm(a) / np.linalg.norm(b))  # noqa: E731
    m1 = h1[0].astype(np.float32).mean(0)
    cosines = {what: cos(m1, h[0].astype(np.float32).mean(0)) for what, h in [("two-chunk", h2), ("token-by-token", h3)]}
    # The broken runs are compared on the second chunk's rows, with the one-shot run's.
    broken = {
        "second chunk without the first's cache": cos(tail(h1), tail(no_cache)),
        "second chunk's positions restarted at 0": cos(tail(h1), tail(restarted)),
    }
    print(
        f"\n{variant}: max abs diff two-chunk {np.abs(h1 - h2).max():.2f}, token-by-token {np.abs(h1 - h3).max():.2f}; "
        + ", ".join(f"{k} mean-pool cosine {v:.6f}" for k, v in {**cosines, **broken}.items())
    )
    bound = PER_CALL_QUANTISED[variant]
    for what, c in cosines.items():
        assert c >= bound, f"{variant}: {what} cosine {c} < {bound}"
    for what, c in broken.items():
        assert c < bound, f"{variant}: the bound {bound} passed a broken run ({what}): cosine {c}"


def test_left_padded_batch(tokenizer):
    """A left-padded batch of two sequences equals the two unbatched runs on the real tokens."""
    sess = session(require(REAL / "model.onnx"))
    a = tokenizer.encode("print('hello, world')").ids
    b = tokenizer.encode("SELECT * FROM orders WHERE total > 100 ORDER BY created_at DESC;").ids
    n = max(len(a), len(b))
    ids = np.full((2, n), 151643, np.int64)
    mask = np.zeros((2, n), np.int64)
    for row, seq in enumerate((a, b)):
        ids[row, n - len(seq):] = seq
        mask[row, n - len(seq):] = 1
    positions = np.clip(np.cumsum(mask, axis=1) - 1, 0, None)
    hb, _ = run(sess, ids, mask=mask, positions=positions)
    worst = 0.0
    for row, seq in enumerate((a, b)):
        h, _ = run(sess, seq)
        worst = max(worst, float(np.abs(hb[row, n - len(seq):] - h[0]).max()))
    print(f"\nleft-padded batch vs unbatched: max abs diff {worst:.2e}")
    # Not exact on any CPU: left padding moves a row's real positions, so the
    # softmax and attention reductions group them differently (rounding only).
    # Measured 4e-5 (AVX-512); the bound is 25x that.
    assert worst <= 1e-3


def test_contract_check_on_real_model():
    """`prepare.py check` reads the contract of the prepared model."""
    require(REAL / "model.onnx")
    out = subprocess.run(
        [sys.executable, str(MODELS / "prepare.py"), "check", str(REAL)], check=True, capture_output=True, text=True
    ).stdout
    found = json.loads(out)
    assert found["layers"] == 24 and found["kv_shape"][1] == 2 and found["kv_shape"][3] == 64
    assert not found["logits"]


def test_import_adopts_a_logits_only_export(tmp_path):
    """A logits-only optimum-style export is refused by the server with a pointer to
    `prepare.py import`, which adds last_hidden_state, drops the lm_head, and serves the same hidden states."""
    src = require(TINY / "model_logits.onnx")
    export = tmp_path / "export"
    export.mkdir()
    m = onnx.load(str(src))
    keep = [o for o in m.graph.output if o.name != "last_hidden_state"]
    del m.graph.output[:]
    m.graph.output.extend(keep)
    onnx.save(m, str(export / "model.onnx"))
    (export / "tokenizer.json").write_bytes((TINY / "tokenizer.json").read_bytes())

    refused = subprocess.run(
        [str(BIN), "serve", "--addr", "127.0.0.1:0", "--model", str(export)], capture_output=True, text=True, timeout=60
    )
    assert refused.returncode != 0
    assert "prepare.py import" in refused.stderr, refused.stderr

    out = tmp_path / "imported"
    subprocess.run(
        [sys.executable, str(MODELS / "prepare.py"), "import", str(export), "--out", str(out)], check=True
    )
    imported = onnx.load(str(out / "model.onnx"))
    assert "last_hidden_state" in [o.name for o in imported.graph.output]
    assert "logits" not in [o.name for o in imported.graph.output]
    assert len(imported.graph.initializer) < len(m.graph.initializer), "the lm_head weight is dropped"
    ids = Tokenizer.from_file(str(TINY / "tokenizer.json")).encode("def f(x): return x").ids
    h_imported, _ = run(session(out / "model.onnx"), ids)
    h_tiny, _ = run(session(TINY / "model.onnx"), ids)
    assert np.abs(h_imported - h_tiny).max() <= 1e-6
    card = json.loads((out / "embedding.json").read_text())
    assert card["pooling"] == "probe_mean" and (out / "embedding_head.safetensors").exists(), card

    # `--card` states what the export is (here: a mean-pooling model): its card says so, and no head is fitted.
    given = tmp_path / "card.json"
    given.write_text(json.dumps({"pooling": "mean", "normalize": True}))
    carded = tmp_path / "carded"
    subprocess.run(
        [sys.executable, str(MODELS / "prepare.py"), "import", str(export), "--out", str(carded), "--card", str(given)],
        check=True,
    )
    card = json.loads((carded / "embedding.json").read_text())
    assert (card["pooling"], card["normalize"]) == ("mean", True) and "--card card.json" in card["source"], card
    assert not (carded / "embedding_head.safetensors").exists(), "a mean-pooling model gets no head"
