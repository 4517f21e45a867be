"""A GGUF the user brings is converted as itself, or refused with the reason.

`prepare.py real --gguf FILE` once installed the cached default model
whatever FILE held. These tests write small random-weight Qwen2 and Qwen3
GGUFs with the `gguf` package (the real tokenizer's vocabulary, copied from
the default model's GGUF; each weight type the conversion reads), convert
them with the model tool (every weight type: F32, F16, BF16, Q8_0, and
llama.cpp's Q4_K_M mix of Q4_K and Q6_K), and check the result against what
was written:

- config.json names the file's own sha256, architecture, layers and sizes
  (no substitution);
- the ONNX graph's hidden states equal a numpy forward pass written here from
  the architectures' description (RMSNorm; Qwen2's q/k/v biases; Qwen3's
  per-head q/k RMSNorm before RoPE and head_dim != hidden / heads; rotate-half
  RoPE, grouped-query causal attention, SwiGLU) on the weights as written,
  dequantised by the gguf package (the format's reference): within 1e-4 of
  the largest value, in f32; the same forward with RoPE on interleaved pairs
  (and, for Qwen3, without the q/k norms) fails it;
- the server serves the converted models: a raw MEAN vector is the mean of
  the reference's rows, and every turn of a conversation (on the KV cache)
  is the reference's one-shot forward over the whole conversation so far;
- a file the tool cannot convert (another architecture, a missing tensor)
  fails with a message naming what is missing, and nothing is installed.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
from conftest import DEADLINE, MODELS, Server

PREPARE = MODELS / "prepare.py"
# The conversion is exact up to float32 rounding: the bound is relative to
# the largest hidden value (its scale), and sits far below what a real
# mistake gives (RoPE on the wrong pairs: above 1e-2, asserted below).
TOLERANCE = 1e-4
# <|endoftext|> in Qwen's vocabulary.
ENDOFTEXT = 151643


@dataclass
class Dims:
    arch: str = "qwen2"
    layers: int = 2
    hidden: int = 64
    ffn: int = 96
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    theta: float = 1_000_000.0
    eps: float = 1e-6


# Qwen3's head size is not hidden / heads (Qwen3-0.6B: hidden 1024, 16 heads of 128).
QWEN3 = Dims(arch="qwen3", layers=2, hidden=64, ffn=96, heads=4, kv_heads=2, head_dim=32)
# K-quant rows are whole blocks of 256 values: every matrix's input width is a
# multiple of 256 (hidden, heads x head_dim, ffn).
QWEN2_K = Dims(hidden=256, ffn=512, heads=4, kv_heads=2, head_dim=64)
QWEN3_K = Dims(arch="qwen3", hidden=256, ffn=512, heads=8, kv_heads=2, head_dim=64)


def default_gguf() -> str:
    out = subprocess.run(
        [sys.executable, str(PREPARE), "gguf-path"], check=True, capture_output=True, text=True, timeout=1800
    )
    return out.stdout.strip()


@pytest.fixture(scope="module")
def vocabulary():
    """The default model's tokenizer metadata (tokens, types, merges)."""
    from gguf import GGUFReader  # noqa: PLC0415

    r = GGUFReader(default_gguf())

    def strings(key):
        f = r.fields[key]
        return [bytes(f.parts[i]).decode("utf-8") for i in f.data]

    types = r.fields["tokenizer.ggml.token_type"]
    return {
        "tokens": strings("tokenizer.ggml.tokens"),
        "types": [int(types.parts[i][0]) for i in types.data],
        "merges": strings("tokenizer.ggml.merges"),
    }


def random_weights(d: Dims, vocab: int, seed: int) -> dict[str, np.ndarray]:
    """Hugging Face layout ([out, in] for a Linear), float32."""
    rng = np.random.default_rng(seed)

    def lin(out, inp):
        return (rng.standard_normal((out, inp)) * 0.08).astype(np.float32)

    def vec(n, around=0.0, spread=0.05):
        return (around + rng.standard_normal(n) * spread).astype(np.float32)

    hd = d.head_dim
    w = {
        "token_embd.weight": (rng.standard_normal((vocab, d.hidden)) * 0.5).astype(np.float32),
        "output_norm.weight": vec(d.hidden, 1.0, 0.1),
    }
    for i in range(d.layers):
        p = f"blk.{i}."
        w |= {
            p + "attn_norm.weight": vec(d.hidden, 1.0, 0.1),
            p + "attn_q.weight": lin(d.heads * hd, d.hidden),
            p + "attn_k.weight": lin(d.kv_heads * hd, d.hidden),
            p + "attn_v.weight": lin(d.kv_heads * hd, d.hidden),
            p + "attn_output.weight": lin(d.hidden, d.heads * hd),
            p + "ffn_norm.weight": vec(d.hidden, 1.0, 0.1),
            p + "ffn_gate.weight": lin(d.ffn, d.hidden),
            p + "ffn_up.weight": lin(d.ffn, d.hidden),
            p + "ffn_down.weight": lin(d.hidden, d.ffn),
        }
        if d.arch == "qwen2":
            w |= {
                p + "attn_q.bias": vec(d.heads * hd, 0.0, 0.1),
                p + "attn_k.bias": vec(d.kv_heads * hd, 0.0, 0.1),
                p + "attn_v.bias": vec(d.kv_heads * hd, 0.0, 0.1),
            }
        else:
            w |= {
                p + "attn_q_norm.weight": vec(hd, 1.0, 0.3),
                p + "attn_k_norm.weight": vec(hd, 1.0, 0.3),
            }
    return w


def k_quant_blocks(shape, qtype, rng) -> np.ndarray:
    """Random K-quant blocks (the gguf package has no quantiser for them):
    random quants and sub-block scales, super-block scales set small enough
    for sane activations. Q4_K: d, dmin (f16), 12 scale bytes, 128 quant
    bytes; Q6_K: 128 low, 64 high quant bytes, 16 int8 scales, d (f16)."""
    from gguf import GGML_QUANT_SIZES  # noqa: PLC0415
    from gguf import GGMLQuantizationType as Q  # noqa: PLC0415

    block, size = GGML_QUANT_SIZES[qtype]
    rows, cols = shape
    assert cols % block == 0, f"a K-quant row is whole blocks of {block}: {shape}"
    raw = rng.integers(0, 256, size=(rows * cols // block, size), dtype=np.uint8)
    if qtype == Q.Q4_K:
        raw[:, 0:4] = np.array([1e-4, 3e-5], dtype=np.float16).view(np.uint8)
    else:
        raw[:, 208:210] = np.array([1e-5], dtype=np.float16).view(np.uint8)
    return raw.reshape(rows, cols // block * size)


def write_gguf(path: Path, d: Dims, vocabulary, weights, kind: str, arch=None, name="Fixture Qwen2", drop=(), pooling=None):
    """Writes the weights as a GGUF (matrices as `kind`, norms and biases in
    F32 as llama.cpp keeps them); returns the weights as the file holds them
    (dequantised by the gguf package). `Q4_K_M` is llama.cpp's mix: Q4_K,
    with Q6_K for attn_v and ffn_down; its blocks are random (see
    `k_quant_blocks`), not the given weights."""
    import gguf  # noqa: PLC0415
    from gguf import GGMLQuantizationType as Q  # noqa: PLC0415

    qtype = {"F32": Q.F32, "F16": Q.F16, "BF16": Q.BF16, "Q8_0": Q.Q8_0, "Q4_K_M": Q.Q4_K}[kind]
    rng = np.random.default_rng(5)
    w = gguf.GGUFWriter(str(path), arch or d.arch)
    w.add_name(name)
    if d.head_dim != d.hidden // d.heads:
        w.add_key_length(d.head_dim)
        w.add_value_length(d.head_dim)
    w.add_context_length(32768)
    w.add_embedding_length(d.hidden)
    w.add_feed_forward_length(d.ffn)
    w.add_block_count(d.layers)
    w.add_head_count(d.heads)
    w.add_head_count_kv(d.kv_heads)
    w.add_rope_freq_base(d.theta)
    w.add_layer_norm_rms_eps(d.eps)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(vocabulary["tokens"])
    w.add_token_types(vocabulary["types"])
    w.add_token_merges(vocabulary["merges"])
    if pooling is not None:
        # What llama.cpp's converter writes for an embedding model: its
        # pooling type, and (last-token models that append one) the EOS.
        w.add_pooling_type(pooling)
        if pooling == gguf.PoolingType.LAST:
            w.add_add_eos_token(True)
            w.add_eos_token_id(ENDOFTEXT)
    held = {}
    for tname, value in weights.items():
        if tname in drop:
            continue
        if value.ndim == 1 or qtype == Q.F32:
            w.add_tensor(tname, value)
            held[tname] = value
        elif qtype == Q.F16:
            w.add_tensor(tname, value.astype(np.float16))
            held[tname] = value.astype(np.float16).astype(np.float32)
        elif qtype == Q.Q4_K:
            t = Q.Q6_K if tname.endswith(("attn_v.weight", "ffn_down.weight")) else Q.Q4_K
            raw = k_quant_blocks(value.shape, t, rng)
            w.add_tensor(tname, raw, raw_dtype=t)
            held[tname] = gguf.quants.dequantize(raw, t).astype(np.float32).reshape(value.shape)
        else:
            raw = gguf.quants.quantize(value, qtype)
            w.add_tensor(tname, raw, raw_dtype=qtype)
            held[tname] = gguf.quants.dequantize(raw, qtype).astype(np.float32).reshape(value.shape)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return held


def reference(w, d: Dims, ids, interleaved=False, qk_norm=True) -> np.ndarray:
    """The last hidden states for `ids`, in float64, from the architecture's
    description. The negative controls: `interleaved`, RoPE on adjacent
    pairs (GPT-J's way, the wrong one for Qwen); `qk_norm=False`, Qwen3
    without its per-head q/k norms."""
    w = {k: v.astype(np.float64) for k, v in w.items()}
    hd, nh, nkv = d.head_dim, d.heads, d.kv_heads
    t = len(ids)
    x = w["token_embd.weight"][ids]
    pos = np.arange(t)
    inv = 1.0 / d.theta ** (np.arange(0, hd, 2) / hd)
    ang = pos[:, None] * inv[None, :]
    cos, sin = np.cos(ang), np.sin(ang)

    def rope(v):  # [heads, t, hd]: the halves rotated (Hugging Face's rotate_half)
        if interleaved:
            a, b = v[..., 0::2], v[..., 1::2]
            out = np.empty_like(v)
            out[..., 0::2], out[..., 1::2] = a * cos - b * sin, b * cos + a * sin
            return out
        a, b = v[..., : hd // 2], v[..., hd // 2 :]
        return np.concatenate([a * cos - b * sin, b * cos + a * sin], axis=-1)

    def rms(v, g):
        return v / np.sqrt((v * v).mean(-1, keepdims=True) + d.eps) * g

    causal = np.triu(np.full((t, t), -np.inf), 1)
    for i in range(d.layers):
        p = f"blk.{i}."
        h = rms(x, w[p + "attn_norm.weight"])
        q, k, v = (h @ w[p + f"attn_{n}.weight"].T + w.get(p + f"attn_{n}.bias", 0.0) for n in "qkv")
        q = q.reshape(t, nh, hd).transpose(1, 0, 2)
        k = k.reshape(t, nkv, hd).transpose(1, 0, 2)
        v = v.reshape(t, nkv, hd).transpose(1, 0, 2)
        if d.arch == "qwen3" and qk_norm:
            q, k = rms(q, w[p + "attn_q_norm.weight"]), rms(k, w[p + "attn_k_norm.weight"])
        q, k = rope(q), rope(k)
        k, v = np.repeat(k, nh // nkv, axis=0), np.repeat(v, nh // nkv, axis=0)
        s = q @ k.transpose(0, 2, 1) / np.sqrt(hd) + causal
        s = np.exp(s - s.max(-1, keepdims=True))
        s /= s.sum(-1, keepdims=True)
        o = (s @ v).transpose(1, 0, 2).reshape(t, nh * hd)
        x = x + o @ w[p + "attn_output.weight"].T
        h = rms(x, w[p + "ffn_norm.weight"])
        g, u = h @ w[p + "ffn_gate.weight"].T, h @ w[p + "ffn_up.weight"].T
        x = x + (g / (1 + np.exp(-g)) * u) @ w[p + "ffn_down.weight"].T
    return rms(x, w["output_norm.weight"])


def onnx_hidden(model: Path, d: Dims, ids) -> np.ndarray:
    import onnxruntime as ort  # noqa: PLC0415

    sess = ort.InferenceSession(str(model), providers=["CPUExecutionProvider"])
    names = {i.name for i in sess.get_inputs()}
    feed = {
        "input_ids": np.array([ids], dtype=np.int64),
        "attention_mask": np.ones((1, len(ids)), dtype=np.int64),
    }
    if "position_ids" in names:
        feed["position_ids"] = np.arange(len(ids), dtype=np.int64)[None]
    for i in range(d.layers):
        for kind in ("key", "value"):
            feed[f"past_key_values.{i}.{kind}"] = np.zeros((1, d.kv_heads, 0, d.head_dim), dtype=np.float32)
    return sess.run(["last_hidden_state"], feed)[0][0]


def prepare(gguf: Path, tmp: Path, *extra: str):
    env = {**os.environ, "SE_CACHE_DIR": str(tmp / "cache")}
    return subprocess.run(
        [sys.executable, str(PREPARE), "real", "--gguf", str(gguf), "--out", str(tmp / "out"), *extra],
        capture_output=True, text=True, env=env, timeout=1800,
    )


def relative(a, b) -> float:
    return float(np.abs(a - b).max() / np.abs(b).max())


def token_ids(tokenizer_json: Path, text: str) -> list[int]:
    from tokenizers import Tokenizer  # noqa: PLC0415

    return Tokenizer.from_file(str(tokenizer_json)).encode(text, add_special_tokens=False).ids


TEXT = "def add(a, b):\n    return a + b  # the sum, 42 times"
TURNS = [
    "def add(a, b):\n    return a + b",
    "Now make it subtract, and name it sub.",
    "Can you add a docstring and type hints?",
]


@pytest.mark.parametrize(
    "d, kind",
    # Each weight type once (reading a tensor is the same code for both
    # architectures), each architecture with a float and a block type.
    [(Dims(), k) for k in ("F32", "F16", "BF16", "Q8_0")]
    + [(QWEN3, "F32"), (QWEN3, "Q8_0")]
    + [(QWEN2_K, "Q4_K_M"), (QWEN3_K, "Q4_K_M")],
    ids=lambda v: v if isinstance(v, str) else v.arch,
)
def test_a_given_gguf_is_converted_as_itself(d, kind, vocabulary, tmp_path):
    weights = random_weights(d, len(vocabulary["tokens"]), seed=7)
    path = tmp_path / f"fixture-{kind}.gguf"
    held = write_gguf(path, d, vocabulary, weights, kind, name=f"Fixture {d.arch} {kind}")
    done = prepare(path, tmp_path, "--head-pairs", "8")
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "out"

    cfg = json.loads((out / "config.json").read_text())
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert cfg["source"]["gguf_sha256"] == digest, cfg
    assert cfg["name"] == f"fixture-{d.arch}-{kind.lower().replace('_', '-')}-{digest[:12]}", cfg
    assert cfg["architecture"] == d.arch, cfg
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["head_dim"]) == (d.layers, d.hidden, d.head_dim), cfg
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"]) == (d.heads, d.kv_heads), cfg

    ids = token_ids(out / "tokenizer.json", TEXT)
    assert len(ids) > 10
    want = reference(held, d, ids)
    got = onnx_hidden(out / "model.onnx", d, ids)
    assert got.shape == want.shape
    print(f"{d.arch} {kind}: hidden states within {relative(got, want):.1e} of the reference")
    assert relative(got, want) <= TOLERANCE, f"{d.arch} {kind}: {relative(got, want):.2e}"
    # The negative controls: the bound catches RoPE rotating the wrong pairs,
    # and Qwen3 without its q/k norms.
    broken = reference(held, d, ids, interleaved=True)
    assert relative(got, broken) > 1e-2, f"the bound would not see interleaved RoPE ({relative(got, broken):.2e})"
    if d.arch == "qwen3":
        broken = reference(held, d, ids, qk_norm=False)
        assert relative(got, broken) > 1e-2, f"the bound would not see missing q/k norms ({relative(got, broken):.2e})"


@pytest.mark.parametrize(
    "d", [Dims(layers=3, hidden=64, ffn=128, heads=8, kv_heads=2, head_dim=8), QWEN3], ids=lambda d: d.arch
)
def test_the_server_serves_a_converted_gguf(d, vocabulary, tmp_path, pb):
    """`serve` on the converted directory: GetModelInfo names the file's
    model; Embed's raw MEAN vector is the reference's mean over the text; and
    each turn of a conversation, prefilled on the cached context, is the mean
    of its rows (MEAN_OVER_TURN) or of every row (the default) in the
    reference's one-shot forward of the whole conversation."""
    import grpc  # noqa: PLC0415

    pb2, rpc = pb
    weights = random_weights(d, len(vocabulary["tokens"]), seed=11)
    path = tmp_path / "served.gguf"
    held = write_gguf(path, d, vocabulary, weights, "F32", name=f"Served {d.arch}")
    done = prepare(path, tmp_path, "--head-pairs", "8")
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "out"
    tokenizer = out / "tokenizer.json"
    ids = token_ids(tokenizer, TEXT)
    want = reference(held, d, ids).mean(axis=0)

    raw = {"pooling": pb2.POOLING_MEAN, "normalize": False, "standardize": pb2.STANDARDIZE_NONE}
    server = Server(model=out)
    try:
        with server.channel() as ch:
            stub = rpc.EmbedderStub(ch)
            info = stub.GetModelInfo(pb2.GetModelInfoRequest(), timeout=DEADLINE)
            assert (info.layers, info.hidden_size, info.kv_heads, info.head_dim) == (
                d.layers, d.hidden, d.kv_heads, d.head_dim,
            ), info
            assert info.name.startswith(f"served-{d.arch}-"), info.name
            reply = stub.Embed(pb2.EmbedRequest(texts=[TEXT], **raw), timeout=DEADLINE)
            # The turn's own rows (the default mean is the conversation's).
            turn_mean = pb2.SessionOptions(**raw, mean_over=pb2.MEAN_OVER_TURN)
            requests = [pb2.ConverseRequest(options=turn_mean)]
            requests += [pb2.ConverseRequest(turn=pb2.Turn(text=t)) for t in TURNS]
            answers = list(stub.Converse(iter(requests), timeout=DEADLINE))
            # The default mean: the whole conversation's (no turn here has a
            # special token, so every row of the context).
            requests[0] = pb2.ConverseRequest(options=pb2.SessionOptions(**raw))
            whole = list(stub.Converse(iter(requests), timeout=DEADLINE))
    except grpc.RpcError as e:
        pytest.fail(f"the server failed on the converted model: {e.code()} {e.details()}")
    finally:
        server.stop()
    [emb] = reply.embeddings
    assert emb.turn_tokens == len(ids)
    got = np.array(emb.values, dtype=np.float64)
    assert got.shape == want.shape
    assert relative(got, want) <= TOLERANCE, f"Embed: {relative(got, want):.2e}"

    assert [a.WhichOneof("result") for a in answers] == ["ready"] + ["embedding"] * len(TURNS), answers
    assert [a.WhichOneof("result") for a in whole] == ["ready"] + ["embedding"] * len(TURNS), whole
    conversation = []
    for k, (text, answer, over_all) in enumerate(zip(TURNS, answers[1:], whole[1:])):
        turn = token_ids(tokenizer, text)
        start = len(conversation)
        conversation += turn
        assert answer.embedding.context_tokens == len(conversation)
        rows = reference(held, d, conversation)
        want = rows[start:].mean(axis=0)
        got = np.array(answer.embedding.values, dtype=np.float64)
        print(f"{d.arch} served, turn {k + 1}: within {relative(got, want):.1e} of the one-shot reference")
        assert relative(got, want) <= TOLERANCE, f"turn {k + 1}: {relative(got, want):.2e}"
        whole_got = np.array(over_all.embedding.values, dtype=np.float64)
        assert relative(whole_got, rows.mean(axis=0)) <= TOLERANCE, f"turn {k + 1}, conversation mean: {relative(whole_got, rows.mean(axis=0)):.2e}"
        if k > 0:
            assert relative(whole_got, want) > 1e-2, f"turn {k + 1}: the default pooled the turn alone"
    # The conversation's bound sees a lost context: turn 3 alone differs.
    alone = reference(held, d, token_ids(tokenizer, TURNS[-1])).mean(axis=0)
    assert relative(got, alone) > 1e-2, f"turn 3 without its context: {relative(got, alone):.2e}"


@pytest.mark.parametrize(
    "case, expect",
    [
        ("llama", "architecture 'llama'"),
        ("missing", "'blk.1.ffn_up.weight'"),
        ("cls", "pooling type CLS"),
    ],
)
def test_a_gguf_the_tool_cannot_convert_is_refused(case, expect, vocabulary, tmp_path):
    d = Dims()
    weights = random_weights(d, len(vocabulary["tokens"]), seed=3)
    path = tmp_path / f"{case}.gguf"
    if case == "llama":
        write_gguf(path, d, vocabulary, weights, "F32", arch="llama")
    elif case == "cls":
        import gguf  # noqa: PLC0415

        write_gguf(path, d, vocabulary, weights, "F32", pooling=gguf.PoolingType.CLS)
    else:
        write_gguf(path, d, vocabulary, weights, "F32", drop={"blk.1.ffn_up.weight"})
    done = prepare(path, tmp_path)
    assert done.returncode != 0
    assert "cannot be converted" in done.stderr and expect in done.stderr, done.stderr[-2000:]
    assert "Traceback" not in done.stderr, done.stderr[-2000:]
    assert not (tmp_path / "out").exists(), "nothing is installed for a file the tool refused"


def unit(v: np.ndarray) -> np.ndarray:
    return v / np.linalg.norm(v)


def test_an_embedding_gguf_is_served_with_its_own_pooling(vocabulary, tmp_path, pb):
    """A Qwen3 GGUF that says what llama.cpp's converter says of
    Qwen3-Embedding (pooling_type LAST, an EOS appended) is prepared with
    its own card: pooling end_token with <|endoftext|>, the known card's
    instruction and Matryoshka widths (those up to its hidden size), and no
    head fitted. Served, every turn of a conversation is the reference's
    last hidden state over the whole conversation and the end token,
    normalised; a query gets the card's instruction; without the end token
    the vector is another one (the bound sees it)."""
    import gguf  # noqa: PLC0415
    import grpc  # noqa: PLC0415

    pb2, rpc = pb
    d = QWEN3
    weights = random_weights(d, len(vocabulary["tokens"]), seed=13)
    path = tmp_path / "embed.gguf"
    held = write_gguf(path, d, vocabulary, weights, "F32", name="Qwen3-Embedding-Fixture", pooling=gguf.PoolingType.LAST)
    done = prepare(path, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "out"
    card = json.loads((out / "embedding.json").read_text())
    assert (card["pooling"], card["end_token"], card["normalize"]) == ("end_token", "<|endoftext|>", True), card
    assert card["dimensions"] == [32, 64], card
    assert card["input_types"]["query"].startswith("Instruct: "), card
    assert "qwen3-embedding.json" in card["source"] and "pooling_type" in card["source"], card
    assert not (out / "embedding_head.safetensors").exists(), "an embedding model gets no head fitted"

    tokenizer = out / "tokenizer.json"
    query = "parse a CSV line"
    server = Server(model=out)
    try:
        with server.channel() as ch:
            stub = rpc.EmbedderStub(ch)
            info = stub.GetModelInfo(pb2.GetModelInfoRequest(), timeout=DEADLINE)
            requests = [pb2.ConverseRequest(turn=pb2.Turn(text=t)) for t in TURNS]
            answers = list(stub.Converse(iter(requests), timeout=DEADLINE))
            queried = stub.Embed(pb2.EmbedRequest(texts=[query], input_type=pb2.INPUT_TYPE_QUERY), timeout=DEADLINE)
    except grpc.RpcError as e:
        pytest.fail(f"the server failed on the embedding model: {e.code()} {e.details()}")
    finally:
        server.stop()
    assert info.pooling == pb2.POOLING_END_TOKEN and info.end_token == "<|endoftext|>", info
    assert list(info.matryoshka_dimensions) == [32, 64] and info.head_dimensions == 0, info

    conversation = []
    for k, (text, answer) in enumerate(zip(TURNS, answers)):
        conversation += token_ids(tokenizer, text)
        assert answer.embedding.context_tokens == len(conversation), "the end token never joins the context"
        want = unit(reference(held, d, conversation + [ENDOFTEXT])[-1])
        got = np.array(answer.embedding.values, dtype=np.float64)
        print(f"embedding model, turn {k + 1}: within {relative(got, want):.1e} of the model's own one-shot vector")
        assert relative(got, want) <= TOLERANCE, f"turn {k + 1}: {relative(got, want):.2e}"
    without = unit(reference(held, d, conversation)[-1])
    assert relative(got, without) > 1e-2, f"without the end token: {relative(got, without):.2e}"

    instruction = card["input_types"]["query"].split("{text}")[0]
    ids = token_ids(tokenizer, instruction) + token_ids(tokenizer, query)
    want = unit(reference(held, d, ids + [ENDOFTEXT])[-1])
    got = np.array(queried.embeddings[0].values, dtype=np.float64)
    assert queried.embeddings[0].turn_tokens == len(ids)
    assert relative(got, want) <= TOLERANCE, f"query: {relative(got, want):.2e}"


def test_a_card_given_by_hand_overrides_the_gguf(vocabulary, tmp_path):
    """`--card FILE` states what a GGUF does not (here: mean pooling on a
    file with no pooling metadata): the prepared card says it, and no head
    is fitted for it."""
    d = Dims()
    path = tmp_path / "plain.gguf"
    write_gguf(path, d, vocabulary, random_weights(d, len(vocabulary["tokens"]), seed=17), "F32", name="Plain")
    given = tmp_path / "card.json"
    given.write_text(json.dumps({"pooling": "mean", "dimensions": [16, 32, 64, 128]}))
    done = prepare(path, tmp_path, "--card", str(given))
    assert done.returncode == 0, done.stderr[-3000:]
    card = json.loads((tmp_path / "out" / "embedding.json").read_text())
    assert (card["pooling"], card["dimensions"]) == ("mean", [16, 32, 64]), card
    assert "--card card.json" in card["source"], card
    assert not (tmp_path / "out" / "embedding_head.safetensors").exists()


def test_a_card_with_its_own_probe_is_profiled_and_served_with_it(vocabulary, tmp_path, pb):
    """A base model's card may name its own probe (`--card`): the statistics
    and the head are computed with that probe and say so, the server loads
    them, and POOLING_PROBE's raw vector is the reference's last hidden state
    over the text and that probe (another probe gives another vector, which
    the bound sees). The files once named the base card's probe whatever the
    card said, and the server refused the head."""
    import struct  # noqa: PLC0415

    import grpc  # noqa: PLC0415

    pb2, rpc = pb
    d = Dims()
    probe = '\nIn one word: "'
    path = tmp_path / "probed.gguf"
    held = write_gguf(path, d, vocabulary, random_weights(d, len(vocabulary["tokens"]), seed=19), "F32", name="Probed")
    given = tmp_path / "card.json"
    given.write_text(json.dumps({"probe": probe}))
    done = prepare(path, tmp_path, "--card", str(given), "--head-pairs", "8")
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "out"

    def metadata(name):
        with open(out / name, "rb") as f:
            n = struct.unpack("<Q", f.read(8))[0]
            return json.loads(f.read(n))["__metadata__"]

    assert json.loads((out / "embedding.json").read_text())["probe"] == probe
    assert metadata("embedding_stats.safetensors")["probe_sha256"] == hashlib.sha256(probe.encode()).hexdigest()
    assert metadata("embedding_head.safetensors")["probe"] == probe

    tokenizer = out / "tokenizer.json"
    raw = {"pooling": pb2.POOLING_PROBE, "normalize": False, "standardize": pb2.STANDARDIZE_NONE}
    server = Server(model=out)
    try:
        with server.channel() as ch:
            stub = rpc.EmbedderStub(ch)
            info = stub.GetModelInfo(pb2.GetModelInfoRequest(), timeout=DEADLINE)
            reply = stub.Embed(pb2.EmbedRequest(texts=[TEXT], **raw), timeout=DEADLINE)
            default = stub.Embed(pb2.EmbedRequest(texts=[TEXT]), timeout=DEADLINE)
    except grpc.RpcError as e:
        pytest.fail(f"the server failed on a card with its own probe: {e.code()} {e.details()}")
    finally:
        server.stop()
    assert info.probe == probe and info.pooling == pb2.POOLING_PROBE_MEAN, info
    assert info.head_dimensions > 0 and len(default.embeddings[0].values) == info.head_dimensions, info
    ids = token_ids(tokenizer, TEXT)
    want = reference(held, d, ids + token_ids(tokenizer, probe))[-1]
    got = np.array(reply.embeddings[0].values, dtype=np.float64)
    assert relative(got, want) <= TOLERANCE, f"the card's probe: {relative(got, want):.2e}"
    base = json.loads((MODELS / "cards" / "base.json").read_text())["probe"]
    other = reference(held, d, ids + token_ids(tokenizer, base))[-1]
    assert relative(got, other) > 1e-2, f"the base card's probe gives the same vector ({relative(got, other):.2e})"
