"""The served model run in Python as the server pools it, for the background
statistics (models/prepare.py) and the quality harness (bench/quality): the
same ONNX graph as the server (f32), optionally with graph outputs for
intermediate layers, run with onnxruntime, batched (right-padded; the graph
masks padding anywhere in a row, so a row's result is its result alone up to
rounding).

Every text runs once; from that pass come, for each layer kept, the mean of
the pooled tokens' hidden states and the last token's, and the mean over
every token of the text that is not one of the tokenizer's special tokens
(`convmean`: for a conversation, MEAN_OVER_CONVERSATION's vector). A probe (a fixed
suffix) runs as a second call on top of the pass's `present.*` and gives its
last token's state per layer, as the server's probe does.
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper
from tokenizers import Tokenizer

# Residual stream after these decoder layers (0-based), for the harness, plus
# "final": the graph's last_hidden_state (the final RMSNorm output, what the
# server pools).
HARNESS_LAYERS = [8, 12, 14, 16, 18, 20, 22]
MAX_TOKENS = 512


def layers_graph(model_dir: Path, work: Path, layers: list[int]) -> Path:
    """model.onnx with the intermediate layers as outputs, in `work`, its
    weights hard-linked (ONNX Runtime refuses external data outside the
    model's directory, symlinks included)."""
    work.mkdir(parents=True, exist_ok=True)
    out = work / "layers.onnx"
    data = work / "model.onnx.data"
    src_data = model_dir / "model.onnx.data"
    if data.exists() and os.stat(data).st_ino != os.stat(src_data).st_ino:
        data.unlink()
    if not data.exists():
        try:
            os.link(src_data, data)
        except OSError:
            import shutil

            shutil.copyfile(src_data, data)
    m = onnx.load(str(model_dir / "model.onnx"), load_external_data=False)
    names = {}
    for node in m.graph.node:
        for o in node.output:
            mm = re.match(r"l(\d+)_res2_\d+$", o)
            if mm:
                names[int(mm.group(1))] = o
    for i in layers:
        m.graph.output.append(helper.make_tensor_value_info(names[i], TensorProto.FLOAT, None))
    onnx.save(m, str(out))
    return out


class Qwen:
    """model_dir's model.onnx; with `layers` (and a `work` directory for the
    modified graph), also those layers' residual streams."""

    def __init__(self, model_dir: Path, work: Path | None = None, layers: list[int] = (), threads: int = 0):
        so = ort.SessionOptions()
        if threads:
            so.intra_op_num_threads = threads
        graph = layers_graph(model_dir, work, list(layers)) if layers else model_dir / "model.onnx"
        self.keys = [str(i) for i in layers] + ["final"]
        self.sess = ort.InferenceSession(str(graph), so, providers=["CPUExecutionProvider"])
        outs = [o.name for o in self.sess.get_outputs()]
        self.layer_outs = [o for o in outs if re.match(r"l\d+_res2", o)]
        self.presents = [o for o in outs if o.startswith("present.")]
        self.n_layers = len(self.presents) // 2
        kv = self.sess.get_inputs()[3].shape
        self.kv_heads, self.head_dim = kv[1], kv[3]
        self.tok = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
        self.special = np.array(sorted(i for i, t in self.tok.get_added_tokens_decoder().items() if t.special), np.int64)
        self.seconds = 0.0
        self.tokens = 0

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def chatml(self, turns: list[tuple[str, str]]) -> tuple[list[int], int, int]:
        """Token ids of a ChatML conversation, and the span of the last
        turn's text tokens (what the server pools), as the server builds them."""
        ids: list[int] = []
        span = (0, 0)
        for role, text in turns:
            ids += self.encode(f"<|im_start|>{role}\n")
            start = len(ids)
            ids += self.encode(text)
            span = (start, len(ids))
            ids += self.encode("<|im_end|>\n")
        return ids, span[0], span[1]

    def _run(self, ids, mask, pos, past, outs):
        feeds = {"input_ids": ids, "attention_mask": mask, "position_ids": pos}
        for i in range(self.n_layers):
            for k in ("key", "value"):
                feeds[f"past_key_values.{i}.{k}"] = past[f"present.{i}.{k}"] if past else np.zeros((ids.shape[0], self.kv_heads, 0, self.head_dim), np.float32)
        t0 = time.perf_counter()
        r = self.sess.run(outs, feeds)
        self.seconds += time.perf_counter() - t0
        self.tokens += int(mask[:, -ids.shape[1] :].sum())
        return dict(zip(outs, r))

    def embed(self, items: list[tuple[list[int], int, int]], probe: list[int] | None = None, batch_tokens: int = 2048,
              probes: dict[str, list[int]] | None = None) -> dict[str, np.ndarray]:
        """items: (ids, pool_start, pool_end). Returns {"mean:L", "last:L",
        "convmean:L", "probe:L"} -> [n, hidden] for every L in self.keys;
        `probes` (name -> ids) adds "probe@name:L" for each, every probe
        read off the same pass over the texts (their outputs do not depend on
        what follows them)."""
        runs = ([("probe", probe)] if probe else []) + [(f"probe@{k}", v) for k, v in (probes or {}).items()]
        n = len(items)
        res: dict[str, np.ndarray] = {}
        # A prefix every item shares (a common system turn) runs once; its
        # cache is the past of every batch (what a server sees anyway).
        pre = 0
        if n > 1:
            first = items[0][0]
            pre = min(len(it[0]) for it in items) - 1
            for it in items[1:]:
                ids_i = it[0]
                k = 0
                while k < pre and ids_i[k] == first[k]:
                    k += 1
                pre = k
            pre = pre if pre >= 64 and all(it[1] >= pre for it in items) else 0
        prefix_kv = None
        names = self.layer_outs + ["last_hidden_state"]
        # Per layer: the sum (f64) of the prefix's non-special rows, and their count.
        prefix_sum = {key: 0.0 for key in self.keys}
        prefix_rows = 0
        if pre:
            ids = np.array([items[0][0][:pre]], np.int64)
            prefix_kv = self._run(ids, np.ones_like(ids), np.arange(pre, dtype=np.int64)[None], None, self.presents + names)
            plain = ~np.isin(ids[0], self.special)
            prefix_rows = int(plain.sum())
            prefix_sum = {key: prefix_kv[name][0, plain].astype(np.float64).sum(0) for key, name in zip(self.keys, names)}
            prefix_kv = {k: prefix_kv[k] for k in self.presents}
        order = np.argsort([len(it[0]) for it in items], kind="stable")
        start = 0
        while start < n:
            count = 1
            while start + count < n and (count + 1) * (len(items[order[start + count]][0]) - pre) <= batch_tokens and count < 256:
                count += 1
            idx = order[start : start + count]
            start += count
            s = max(len(items[i][0]) for i in idx) - pre
            b = len(idx)
            ids = np.zeros((b, s), np.int64)
            mask = np.zeros((b, pre + s), np.int64)
            mask[:, :pre] = 1
            for r, i in enumerate(idx):
                t = items[i][0][pre:]
                ids[r, : len(t)] = t
                mask[r, pre : pre + len(t)] = 1
            pos = np.tile(np.arange(pre, pre + s, dtype=np.int64), (b, 1))
            past = {k: np.repeat(v, b, axis=0) for k, v in prefix_kv.items()} if prefix_kv else None
            want = self.layer_outs + ["last_hidden_state"] + (self.presents if runs else [])
            out = self._run(ids, mask, pos, past, want)
            # Per row, which of its own tokens join the conversation's mean.
            plain = [~np.isin(np.array(items[i][0][pre:], np.int64), self.special) for i in idx]
            for key, name in zip(self.keys, self.layer_outs + ["last_hidden_state"]):
                h = out[name]
                for r, i in enumerate(idx):
                    _, a, z = items[i]
                    res.setdefault("mean:" + key, np.zeros((n, h.shape[-1]), np.float32))[i] = h[r, a - pre : z - pre].mean(0)
                    res.setdefault("last:" + key, np.zeros((n, h.shape[-1]), np.float32))[i] = h[r, z - pre - 1]
                    own = plain[r]
                    total = prefix_sum[key] + h[r, : len(own)][own].astype(np.float64).sum(0)
                    res.setdefault("convmean:" + key, np.zeros((n, h.shape[-1]), np.float32))[i] = total / max(prefix_rows + int(own.sum()), 1)
            for label, pr in runs:
                p = len(pr)
                pids = np.tile(np.array(pr, np.int64), (b, 1))
                pmask = np.concatenate([mask, np.ones((b, p), np.int64)], axis=1)
                ppos = np.stack([np.arange(len(items[i][0]), len(items[i][0]) + p, dtype=np.int64) for i in idx])
                pout = self._run(pids, pmask, ppos, out, self.layer_outs + ["last_hidden_state"])
                for key, name in zip(self.keys, self.layer_outs + ["last_hidden_state"]):
                    h = pout[name]
                    res.setdefault(f"{label}:{key}", np.zeros((n, h.shape[-1]), np.float32))[idx] = h[:, -1]
        return res


def model_hash(model_dir: Path) -> str:
    h = hashlib.sha256((model_dir / "model.onnx").read_bytes())
    data = model_dir / "model.onnx.data"  # the real model's weights (a small model has none)
    if data.exists():
        h.update(f"{os.stat(data).st_size}".encode())
    return h.hexdigest()[:16]
