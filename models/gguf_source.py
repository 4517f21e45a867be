"""Reads a Qwen2 or Qwen3 GGUF: architecture facts, float32 weights and the
tokenizer.

A GGUF this module cannot read as one of those decoders (another
architecture, missing tensors or metadata, another tokenizer, a tensor type
the gguf package cannot dequantise) raises `Unsupported` naming what is
missing: the model tool converts the given file or nothing.

The tokenizer is rebuilt from the GGUF's own tokens, merges and token types
into the Hugging Face tokenizers format, with the Qwen2 pre-tokenizer. Nothing
is guessed: a GGUF without tokenizer metadata is an error.
"""

from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType, GGUFReader, PoolingType
from gguf.quants import _type_traits as quant_traits
from gguf.quants import dequantize

from qwen_onnx import Arch, Layer, Weights

# The Qwen2 pre-tokenizer regex (tokenizer.ggml.pre == "qwen2"): digits one
# at a time, letters with one leading non-letter, punctuation runs, newlines.
QWEN2_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)

# The tensors of each layer (blk.N.<name>) of each architecture converted.
COMMON_TENSORS = [
    "attn_norm.weight",
    "attn_q.weight",
    "attn_k.weight",
    "attn_v.weight",
    "attn_output.weight",
    "ffn_norm.weight",
    "ffn_gate.weight",
    "ffn_up.weight",
    "ffn_down.weight",
]
LAYER_TENSORS = {
    "qwen2": [*COMMON_TENSORS, "attn_q.bias", "attn_k.bias", "attn_v.bias"],
    "qwen3": [*COMMON_TENSORS, "attn_q_norm.weight", "attn_k_norm.weight"],
}

# GGUF token types (llama.cpp's llama_token_type).
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6


class Unsupported(ValueError):
    """The GGUF is not one this tool can convert; the message says why."""


class GgufSource:
    def __init__(self, path: str):
        self.path = path
        self.reader = GGUFReader(path)
        self.tensors = {t.name: t for t in self.reader.tensors}

    def field(self, key: str):
        f = self.reader.fields.get(key)
        if f is None:
            raise Unsupported(f"its metadata has no {key!r}")
        return f.contents()

    def optional_field(self, key: str):
        f = self.reader.fields.get(key)
        return None if f is None else f.contents()

    def string_array(self, key: str) -> list[str]:
        f = self.reader.fields.get(key)
        if f is None:
            raise Unsupported(f"its metadata has no {key!r}")
        return [bytes(f.parts[i]).decode("utf-8") for i in f.data]

    def arch(self) -> Arch:
        a = self.field("general.architecture")
        if a not in LAYER_TENSORS:
            raise Unsupported(
                f"architecture {a!r}: this tool converts {' and '.join(LAYER_TENSORS)} (Qwen2, Qwen2.5, Qwen3) decoders only"
            )
        hidden = int(self.field(f"{a}.embedding_length"))
        heads = int(self.field(f"{a}.attention.head_count"))
        kv_heads = int(self.field(f"{a}.attention.head_count_kv"))
        # The GGUF's own head size when it states one (Qwen3's is not
        # hidden / heads); else hidden / heads.
        key_length = self.reader.fields.get(f"{a}.attention.key_length")
        head_dim = int(key_length.contents()) if key_length is not None else hidden // heads
        value_length = self.reader.fields.get(f"{a}.attention.value_length")
        if value_length is not None and int(value_length.contents()) != head_dim:
            raise Unsupported(f"value_length {int(value_length.contents())} differs from key_length {head_dim}")
        if "blk.0.attn_k.weight" not in self.tensors:
            raise Unsupported("it has no tensor 'blk.0.attn_k.weight'")
        k_rows = int(self.tensors["blk.0.attn_k.weight"].shape.tolist()[-1])
        if k_rows != kv_heads * head_dim:
            raise Unsupported(f"blk.0.attn_k.weight has {k_rows} rows, not kv_heads {kv_heads} x head_dim {head_dim}")
        if heads % kv_heads != 0:
            raise Unsupported(f"{heads} query heads are not a multiple of {kv_heads} KV heads")
        if "tokenizer.ggml.tokens" not in self.reader.fields:
            raise Unsupported("its metadata has no 'tokenizer.ggml.tokens'")
        scaling = self.optional_field(f"{a}.rope.scaling.type")
        if scaling not in (None, "none"):
            raise Unsupported(f"RoPE scaling {scaling!r} is not converted")
        return Arch(
            layers=int(self.field(f"{a}.block_count")),
            hidden=hidden,
            ffn=int(self.field(f"{a}.feed_forward_length")),
            heads=heads,
            kv_heads=kv_heads,
            head_dim=head_dim,
            vocab=len(self.reader.fields["tokenizer.ggml.tokens"].data),
            rope_theta=float(self.field(f"{a}.rope.freq_base")),
            rms_eps=float(self.field(f"{a}.attention.layer_norm_rms_epsilon")),
            max_positions=int(self.field(f"{a}.context_length")),
            architecture=a,
        )

    def check(self, arch: Arch) -> None:
        """Everything the conversion reads is there: every tensor of every
        layer, and a byte-level BPE tokenizer with its pre-tokenizer."""
        names = ["token_embd.weight", "output_norm.weight"]
        for i in range(arch.layers):
            names += [f"blk.{i}.{t}" for t in LAYER_TENSORS[arch.architecture]]
        missing = [n for n in names if n not in self.tensors]
        if missing:
            more = f" and {len(missing) - 5} more" if len(missing) > 5 else ""
            raise Unsupported(f"it has no tensor {', '.join(repr(n) for n in missing[:5])}{more}")
        readable = {GGMLQuantizationType.F32, GGMLQuantizationType.F16, *quant_traits}
        for n in names:
            kind = self.tensors[n].tensor_type
            if kind not in readable:
                raise Unsupported(f"tensor {n!r} is of type {kind.name}, which the gguf package cannot dequantise")
        model = self.field("tokenizer.ggml.model")
        pre = self.field("tokenizer.ggml.pre")
        if model != "gpt2" or pre != "qwen2":
            raise Unsupported(f"its tokenizer is {model}/{pre}, not the byte-level BPE of qwen2 (gpt2/qwen2)")
        for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.token_type", "tokenizer.ggml.merges"):
            if key not in self.reader.fields:
                raise Unsupported(f"its metadata has no {key!r}")

    def tensor(self, name: str) -> np.ndarray:
        """A tensor dequantised to float32 in Hugging Face layout ([out, in] for Linear)."""
        t = self.tensors[name]
        if t.tensor_type == GGMLQuantizationType.F32:
            a = np.array(t.data, dtype=np.float32)
        elif t.tensor_type == GGMLQuantizationType.F16:
            a = np.array(t.data, dtype=np.float16).astype(np.float32)
        else:
            a = dequantize(t.data, t.tensor_type).astype(np.float32, copy=False)
        shape = tuple(int(x) for x in reversed(t.shape.tolist()))
        return a.reshape(shape)

    def weights(self, arch: Arch, lm_head: bool = False, progress=None) -> Weights:
        layers = []
        qwen3 = arch.architecture == "qwen3"
        for i in range(arch.layers):
            p = f"blk.{i}."

            def bias(name, p=p):  # Qwen2's, not Qwen3's
                return None if qwen3 else self.tensor(p + name)

            def norm(name, p=p):  # Qwen3's, not Qwen2's
                return self.tensor(p + name) if qwen3 else None

            layers.append(
                Layer(
                    attn_norm=self.tensor(p + "attn_norm.weight"),
                    q_w=self.tensor(p + "attn_q.weight"),
                    q_b=bias("attn_q.bias"),
                    k_w=self.tensor(p + "attn_k.weight"),
                    k_b=bias("attn_k.bias"),
                    v_w=self.tensor(p + "attn_v.weight"),
                    v_b=bias("attn_v.bias"),
                    q_norm=norm("attn_q_norm.weight"),
                    k_norm=norm("attn_k_norm.weight"),
                    o_w=self.tensor(p + "attn_output.weight"),
                    ffn_norm=self.tensor(p + "ffn_norm.weight"),
                    gate_w=self.tensor(p + "ffn_gate.weight"),
                    up_w=self.tensor(p + "ffn_up.weight"),
                    down_w=self.tensor(p + "ffn_down.weight"),
                )
            )
            if progress:
                progress(i + 1, arch.layers)
        return Weights(
            embed=self.tensor("token_embd.weight"),
            layers=layers,
            final_norm=self.tensor("output_norm.weight"),
            lm_head=self.tensor("output.weight") if lm_head else None,
        )

    def pooling(self, arch: Arch) -> tuple[str | None, str | None]:
        """What the GGUF says of its own pooling, as llama.cpp reads it: the
        card's pooling ("end_token", "last_token", "mean"; None when it
        states none, a base model) and the end token appended after the text
        (tokenizer.ggml.add_eos_token's EOS; None when none is appended)."""
        kind = self.optional_field(f"{arch.architecture}.pooling_type")
        end = None
        if self.optional_field("tokenizer.ggml.add_eos_token"):
            eos = self.optional_field("tokenizer.ggml.eos_token_id")
            if eos is None:
                raise Unsupported("it asks for an EOS token after the text (add_eos_token) but names none")
            end = self.string_array("tokenizer.ggml.tokens")[int(eos)]
        if kind is None or int(kind) == PoolingType.NONE:
            return None, end
        kind = PoolingType(int(kind))
        if kind == PoolingType.LAST:
            return ("end_token" if end else "last_token"), end
        if kind == PoolingType.MEAN:
            return "mean", end
        raise Unsupported(f"pooling type {kind.name}: a causal decoder's stateful vectors are served with LAST or MEAN pooling only")

    def tokenizer_json(self) -> dict:
        model = self.field("tokenizer.ggml.model")
        pre = self.field("tokenizer.ggml.pre")
        if model != "gpt2" or pre != "qwen2":
            raise Unsupported(f"its tokenizer is {model}/{pre}, not the byte-level BPE of qwen2 (gpt2/qwen2)")
        tokens = self.string_array("tokenizer.ggml.tokens")
        types_field = self.reader.fields["tokenizer.ggml.token_type"]
        types = [int(types_field.parts[i][0]) for i in types_field.data]
        merges = self.string_array("tokenizer.ggml.merges")

        vocab = {}
        added = []
        for i, (tok, kind) in enumerate(zip(tokens, types)):
            if kind == NORMAL:
                vocab[tok] = i
            elif kind in (CONTROL, USER_DEFINED):
                added.append(
                    {
                        "id": i,
                        "content": tok,
                        "single_word": False,
                        "lstrip": False,
                        "rstrip": False,
                        "normalized": False,
                        "special": kind == CONTROL,
                    }
                )
            # UNUSED ([PADnnnnnn] rows that pad the embedding matrix) never
            # come out of the tokenizer and are left out, as in Qwen's own file.
        byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False, "use_regex": False}
        return {
            "version": "1.0",
            "truncation": None,
            "padding": None,
            "added_tokens": added,
            "normalizer": {"type": "NFC"},
            "pre_tokenizer": {
                "type": "Sequence",
                "pretokenizers": [
                    {"type": "Split", "pattern": {"Regex": QWEN2_PATTERN}, "behavior": "Isolated", "invert": False},
                    byte_level,
                ],
            },
            "post_processor": dict(byte_level),
            "decoder": dict(byte_level),
            "model": {
                "type": "BPE",
                "dropout": None,
                "unk_token": None,
                "continuing_subword_prefix": "",
                "end_of_word_suffix": "",
                "fuse_unk": False,
                "byte_fallback": False,
                "ignore_merges": False,
                "vocab": vocab,
                "merges": [m.split(" ", 1) for m in merges],
            },
        }
