"""Builds a Qwen2- or Qwen3-architecture decoder as an ONNX graph with the
optimum / onnx-community I/O contract, from plain numpy weights.

Qwen3 differs from Qwen2 in its attention only: no q/k/v biases, an RMSNorm
over each head's query and key (weights of head_dim) before RoPE, and a head
size that need not be hidden / heads (the projections are heads x head_dim
wide). Both use rotate-half RoPE, grouped-query attention and SwiGLU.

Contract (see models/README.md):
  inputs   input_ids            int64 [batch, seq]
           attention_mask       int64 [batch, past + seq]
           position_ids         int64 [batch, seq]
           past_key_values.{i}.key|value   KV [batch, kv_heads, past, head_dim]
  outputs  last_hidden_state    H  [batch, seq, hidden]   (final RMSNorm output)
           present.{i}.key|value         KV [batch, kv_heads, past + seq, head_dim]
           logits               H  [batch, seq, vocab]    (only with lm_head=True)

KV and H are float32, or float16 for the fp16 variant. The arithmetic is always
float32: an fp16 graph stores its weights in float16 and casts them up (ONNX
Runtime folds those casts at load), and keeps its KV cache in float16, which
halves the memory a conversation costs. x86 CPUs have no fast fp16 GEMM, so
computing in fp16 would be slower and less exact.

Attention combines the causal mask with attention_mask, so masked positions
anywhere in a row are ignored: a batch whose rows are padded (before a row's
cached tokens, or between them and its new tokens) gives each row the result
it would get alone, up to float rounding. Grouped-query attention does not
copy K/V per query head: the query heads of one KV head are stacked along the
sequence axis ([b, kv, n_rep * s, d]) and share one MatMul against that KV head.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

OPSET = 17


@dataclass(frozen=True)
class Arch:
    """The architecture facts the graph needs (config.json holds the same)."""

    layers: int
    hidden: int
    ffn: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    rope_theta: float
    rms_eps: float
    max_positions: int
    # "qwen2" (q/k/v biases) or "qwen3" (per-head q/k RMSNorm, no biases).
    architecture: str = "qwen2"

    def to_config(self, name: str, **extra) -> dict:
        return {
            "name": name,
            "architecture": self.architecture,
            "num_hidden_layers": self.layers,
            "hidden_size": self.hidden,
            "intermediate_size": self.ffn,
            "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads,
            "head_dim": self.head_dim,
            "vocab_size": self.vocab,
            "rope_theta": self.rope_theta,
            "rms_norm_eps": self.rms_eps,
            "max_position_embeddings": self.max_positions,
            **extra,
        }


@dataclass
class Layer:
    """One block's weights in Hugging Face layout: Linear weights are [out, in]."""

    attn_norm: np.ndarray
    q_w: np.ndarray
    q_b: np.ndarray | None  # Qwen2's biases; None in Qwen3
    k_w: np.ndarray
    k_b: np.ndarray | None
    v_w: np.ndarray
    v_b: np.ndarray | None
    o_w: np.ndarray
    ffn_norm: np.ndarray
    gate_w: np.ndarray
    up_w: np.ndarray
    down_w: np.ndarray
    q_norm: np.ndarray | None = None  # Qwen3's per-head RMSNorm weights [head_dim]
    k_norm: np.ndarray | None = None


@dataclass
class Weights:
    embed: np.ndarray  # [vocab, hidden]
    layers: list[Layer]
    final_norm: np.ndarray  # [hidden]
    lm_head: np.ndarray | None = None  # [vocab, hidden]


class _Builder:
    def __init__(self, store: np.dtype):
        self.nodes: list[onnx.NodeProto] = []
        self.inits: list[onnx.TensorProto] = []
        self.store = store
        self._n = 0

    def name(self, hint: str) -> str:
        self._n += 1
        return f"{hint}_{self._n}"

    def op(self, op_type: str, inputs: list[str], hint: str | None = None, n_out: int = 1, **attrs):
        outs = [self.name(hint or op_type) for _ in range(n_out)]
        self.nodes.append(helper.make_node(op_type, inputs, outs, name=self.name("n_" + op_type), **attrs))
        return outs[0] if n_out == 1 else outs

    def const(self, value, dtype, hint="c") -> str:
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.asarray(value, dtype=dtype), name))
        return name

    def weight(self, array: np.ndarray, hint: str) -> str:
        """A learned tensor: stored in the variant's dtype, used as float32."""
        name = self.name(hint)
        self.inits.append(numpy_helper.from_array(np.ascontiguousarray(array, dtype=self.store), name))
        if self.store == np.float32:
            return name
        return self.op("Cast", [name], hint + "_f32", to=TensorProto.FLOAT)


def build(arch: Arch, w: Weights, kv_dtype=np.float32, lm_head: bool = False) -> onnx.ModelProto:
    """Returns the decoder graph. kv_dtype float16 makes the fp16 variant."""
    store = np.dtype(kv_dtype)
    io_type = TensorProto.FLOAT if store == np.float32 else TensorProto.FLOAT16
    b = _Builder(store)
    d, nh, nkv = arch.head_dim, arch.heads, arch.kv_heads
    n_rep = nh // nkv
    if nh % nkv != 0:
        raise ValueError(f"{nh} query heads are not a multiple of {nkv} KV heads")

    inputs = [
        helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
        helper.make_tensor_value_info("attention_mask", TensorProto.INT64, ["batch_size", "total_sequence_length"]),
        helper.make_tensor_value_info("position_ids", TensorProto.INT64, ["batch_size", "sequence_length"]),
    ]
    outputs = [
        helper.make_tensor_value_info("last_hidden_state", io_type, ["batch_size", "sequence_length", arch.hidden]),
    ]
    for i in range(arch.layers):
        for kind in ("key", "value"):
            inputs.append(
                helper.make_tensor_value_info(
                    f"past_key_values.{i}.{kind}", io_type, ["batch_size", nkv, "past_sequence_length", d]
                )
            )
            outputs.append(
                helper.make_tensor_value_info(
                    f"present.{i}.{kind}", io_type, ["batch_size", nkv, "total_sequence_length", d]
                )
            )

    i64 = np.int64
    zero = b.const([0], i64, "zero")
    one = b.const([1], i64, "one")
    two = b.const([2], i64, "two")
    minus1 = b.const([-1], i64, "minus1")

    # Lengths: s = new tokens, past = cached tokens, total = past + s.
    ids_shape = b.op("Shape", ["input_ids"], "ids_shape")
    s_len = b.op("Gather", [ids_shape, one], "s_len", axis=0)  # [1]
    past_shape = b.op("Shape", ["past_key_values.0.key"], "past_shape")
    past_len = b.op("Gather", [past_shape, two], "past_len", axis=0)  # [1]
    total_len = b.op("Add", [past_len, s_len], "total_len")
    s_scalar = b.op("Squeeze", [s_len, zero], "s_scalar")
    past_scalar = b.op("Squeeze", [past_len, zero], "past_scalar")
    total_scalar = b.op("Squeeze", [total_len, zero], "total_scalar")
    one_scalar = b.const(1, i64, "one_s")
    zero_scalar = b.const(0, i64, "zero_s")

    # Mask [b, 1, n_rep * s, total]: key j is visible to query i (absolute
    # position past + i) iff j <= past + i and attention_mask[b, j] == 1.
    q_pos = b.op("Range", [past_scalar, total_scalar, one_scalar], "q_pos")  # [s]
    k_pos = b.op("Range", [zero_scalar, total_scalar, one_scalar], "k_pos")  # [total]
    q_col = b.op("Unsqueeze", [q_pos, one], "q_col")  # [s, 1]
    causal = b.op("LessOrEqual", [k_pos, q_col], "causal")  # [s, total]
    pad = b.op("Cast", ["attention_mask"], "pad", to=TensorProto.BOOL)  # [b, total]
    pad4 = b.op("Unsqueeze", [pad, b.const([1, 2], i64)], "pad4")  # [b, 1, 1, total]
    allowed = b.op("And", [causal, pad4], "allowed")  # [b, 1, s, total]
    allowed = b.op("Tile", [allowed, b.const([1, 1, n_rep, 1], i64)], "allowed_rep")  # [b, 1, n_rep*s, total]
    # Built once as an additive bias (0 or float32 min) and added to every
    # layer's scores: a broadcast Add is ~3x cheaper than a per-layer Where in
    # ONNX Runtime (a quarter of a 45-token turn's time at 4,000 tokens of
    # context), and bit-identical, since score + min rounds to min.
    neg = b.const(np.finfo(np.float32).min, np.float32, "neg")
    mask_bias = b.op("Where", [allowed, b.const(0.0, np.float32, "zero_f"), neg], "mask_bias")

    # Rotary embedding (NEOX / rotate-half), computed from position_ids in f32.
    inv_freq = 1.0 / (arch.rope_theta ** (np.arange(0, d, 2, dtype=np.float64) / d))
    inv_freq = b.const(inv_freq.astype(np.float32).reshape(1, 1, d // 2), np.float32, "inv_freq")
    pos_f = b.op("Cast", ["position_ids"], "pos_f", to=TensorProto.FLOAT)
    pos_f = b.op("Unsqueeze", [pos_f, minus1], "pos_f3")  # [b, s, 1]
    freqs = b.op("Mul", [pos_f, inv_freq], "freqs")  # [b, s, d/2]
    emb = b.op("Concat", [freqs, freqs], "emb", axis=-1)  # [b, s, d]
    cos = b.op("Unsqueeze", [b.op("Cos", [emb]), one], "cos")  # [b, 1, s, d]
    sin = b.op("Unsqueeze", [b.op("Sin", [emb]), one], "sin")
    half = b.const([d // 2], i64, "half")
    full = b.const([d], i64, "full")
    last_axis = b.const([-1], i64, "last_axis")

    def rope(x: str) -> str:
        x1 = b.op("Slice", [x, zero, half, last_axis], "x1")
        x2 = b.op("Slice", [x, half, full, last_axis], "x2")
        rot = b.op("Concat", [b.op("Neg", [x2]), x1], "rot", axis=-1)
        return b.op("Add", [b.op("Mul", [x, cos]), b.op("Mul", [rot, sin])], "roped")

    eps = b.const(arch.rms_eps, np.float32, "eps")
    two_f = b.const(2.0, np.float32, "two_f")

    def rms_norm(x: str, weight: np.ndarray, hint: str) -> str:
        # The pattern ONNX Runtime fuses into SimplifiedLayerNormalization.
        sq = b.op("Pow", [x, two_f], hint + "_sq")
        mean = b.op("ReduceMean", [sq], hint + "_mean", axes=[-1], keepdims=1)
        std = b.op("Sqrt", [b.op("Add", [mean, eps])], hint + "_std")
        normed = b.op("Div", [x, std], hint + "_normed")
        return b.op("Mul", [normed, b.weight(weight, hint + "_w")], hint)

    def linear(x: str, weight: np.ndarray, bias: np.ndarray | None, hint: str) -> str:
        y = b.op("MatMul", [x, b.weight(weight.T, hint + "_wT")], hint)
        if bias is not None:
            y = b.op("Add", [y, b.weight(bias, hint + "_b")], hint + "_biased")
        return y

    emb_table = b.weight(w.embed, "embed_tokens")
    x = b.op("Gather", [emb_table, "input_ids"], "embeds", axis=0)  # [b, s, hidden]

    qkv_split = b.const([nh * d, nkv * d, nkv * d], i64, "qkv_split")
    ffn_split = b.const([arch.ffn, arch.ffn], i64, "ffn_split")
    q_shape = b.const([0, 0, nh, d], i64, "q_shape")
    kv_shape = b.const([0, 0, nkv, d], i64, "kv_shape")
    grouped_shape = b.const([0, nkv, -1, d], i64, "grouped_shape")
    heads_shape = b.const([0, nh, -1, d], i64, "heads_shape")
    merged_shape = b.const([0, 0, nh * d], i64, "merged_shape")
    scale = b.const(1.0 / np.sqrt(d), np.float32, "scale")

    for i, L in enumerate(w.layers):
        p = f"l{i}"
        h = rms_norm(x, L.attn_norm, p + "_attn_norm")
        qkv_w = np.concatenate([L.q_w, L.k_w, L.v_w], axis=0)
        biases = [L.q_b, L.k_b, L.v_b]
        if any(bias is None for bias in biases) and any(bias is not None for bias in biases):
            raise ValueError(f"layer {i}: some of q/k/v have biases and some not")
        qkv_b = None if biases[0] is None else np.concatenate(biases, axis=0)
        qkv = linear(h, qkv_w, qkv_b, p + "_qkv")
        q, k, v = b.op("Split", [qkv, qkv_split], p + "_qkv_part", n_out=3, axis=-1)
        q = b.op("Transpose", [b.op("Reshape", [q, q_shape])], p + "_q", perm=[0, 2, 1, 3])  # [b, nh, s, d]
        k = b.op("Transpose", [b.op("Reshape", [k, kv_shape])], p + "_k", perm=[0, 2, 1, 3])  # [b, nkv, s, d]
        v = b.op("Transpose", [b.op("Reshape", [v, kv_shape])], p + "_v", perm=[0, 2, 1, 3])
        if (L.q_norm is None) != (L.k_norm is None):
            raise ValueError(f"layer {i}: a q norm without a k norm, or the other way round")
        if L.q_norm is not None:
            # Qwen3: each head's query and key normalised over head_dim, before RoPE.
            q = rms_norm(q, L.q_norm, p + "_q_norm")
            k = rms_norm(k, L.k_norm, p + "_k_norm")
        q = rope(q)
        k = rope(k)

        past_k, past_v = f"past_key_values.{i}.key", f"past_key_values.{i}.value"
        present_k, present_v = f"present.{i}.key", f"present.{i}.value"
        if store == np.float32:
            b.nodes.append(helper.make_node("Concat", [past_k, k], [present_k], axis=2, name=p + "_cat_k"))
            b.nodes.append(helper.make_node("Concat", [past_v, v], [present_v], axis=2, name=p + "_cat_v"))
            k_all, v_all = present_k, present_v
        else:
            k16 = b.op("Cast", [k], p + "_k16", to=io_type)
            v16 = b.op("Cast", [v], p + "_v16", to=io_type)
            b.nodes.append(helper.make_node("Concat", [past_k, k16], [present_k], axis=2, name=p + "_cat_k"))
            b.nodes.append(helper.make_node("Concat", [past_v, v16], [present_v], axis=2, name=p + "_cat_v"))
            k_all = b.op("Cast", [present_k], p + "_k_all", to=TensorProto.FLOAT)
            v_all = b.op("Cast", [present_v], p + "_v_all", to=TensorProto.FLOAT)

        # Query heads grouped under their KV head: [b, nkv, n_rep * s, d].
        qg = b.op("Reshape", [b.op("Mul", [q, scale]), grouped_shape], p + "_qg")
        kt = b.op("Transpose", [k_all], p + "_kt", perm=[0, 1, 3, 2])  # [b, nkv, d, total]
        scores = b.op("MatMul", [qg, kt], p + "_scores")  # [b, nkv, n_rep*s, total]
        scores = b.op("Add", [scores, mask_bias], p + "_masked")
        probs = b.op("Softmax", [scores], p + "_probs", axis=-1)
        ctx = b.op("MatMul", [probs, v_all], p + "_ctx")  # [b, nkv, n_rep*s, d]
        ctx = b.op("Reshape", [ctx, heads_shape], p + "_ctx_heads")  # [b, nh, s, d]
        ctx = b.op("Transpose", [ctx], p + "_ctx_t", perm=[0, 2, 1, 3])
        ctx = b.op("Reshape", [ctx, merged_shape], p + "_ctx_m")  # [b, s, hidden]
        x = b.op("Add", [x, linear(ctx, L.o_w, None, p + "_o")], p + "_res1")

        h = rms_norm(x, L.ffn_norm, p + "_ffn_norm")
        gu_w = np.concatenate([L.gate_w, L.up_w], axis=0)
        gate, up = b.op("Split", [linear(h, gu_w, None, p + "_gate_up"), ffn_split], p + "_gu", n_out=2, axis=-1)
        act = b.op("Mul", [b.op("Mul", [gate, b.op("Sigmoid", [gate])]), up], p + "_act")
        x = b.op("Add", [x, linear(act, L.down_w, None, p + "_down")], p + "_res2")

    hidden = rms_norm(x, w.final_norm, "final_norm")
    if store == np.float32:
        b.nodes.append(helper.make_node("Identity", [hidden], ["last_hidden_state"], name="out_hidden"))
    else:
        b.nodes.append(helper.make_node("Cast", [hidden], ["last_hidden_state"], name="out_hidden", to=io_type))
    if lm_head:
        if w.lm_head is None:
            raise ValueError("lm_head=True needs the lm_head weights")
        logits = linear(hidden, w.lm_head, None, "lm_head")
        b.nodes.append(helper.make_node("Identity", [logits], ["logits"], name="out_logits"))
        outputs.append(helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", arch.vocab]))

    graph = helper.make_graph(b.nodes, "qwen2_decoder", inputs, outputs, initializer=b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)], producer_name="stateful-embedder")
    model.ir_version = 8
    return model


def random_weights(arch: Arch, seed: int) -> Weights:
    """Seeded random weights with sane scales, for the tiny test fixtures
    (Qwen2's q/k/v biases, or Qwen3's per-head q/k norms, by `arch`)."""
    rng = np.random.default_rng(seed)
    h, f, d = arch.hidden, arch.ffn, arch.head_dim
    qwen3 = arch.architecture == "qwen3"

    def lin(out: int, inp: int) -> np.ndarray:
        return (rng.standard_normal((out, inp)) / np.sqrt(inp)).astype(np.float32)

    def norm(n: int = h) -> np.ndarray:
        return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)

    def bias(n: int) -> np.ndarray | None:
        return None if qwen3 else (0.1 * rng.standard_normal(n)).astype(np.float32)

    layers = []
    for _ in range(arch.layers):
        layers.append(
            Layer(
                attn_norm=norm(),
                q_w=lin(arch.heads * d, h),
                q_b=bias(arch.heads * d),
                k_w=lin(arch.kv_heads * d, h),
                k_b=bias(arch.kv_heads * d),
                v_w=lin(arch.kv_heads * d, h),
                v_b=bias(arch.kv_heads * d),
                o_w=lin(h, arch.heads * d),
                ffn_norm=norm(),
                gate_w=lin(f, h),
                up_w=lin(f, h),
                down_w=lin(h, f),
                q_norm=norm(d) if qwen3 else None,
                k_norm=norm(d) if qwen3 else None,
            )
        )
    embed = rng.standard_normal((arch.vocab, h)).astype(np.float32)
    return Weights(embed=embed, layers=layers, final_norm=norm(), lm_head=lin(arch.vocab, h))
