"""The proto as the field checks it: `buf lint` (buf.yaml's rules) and no
wire-breaking change against the released API (proto/baseline.binpb) —
with a change that does break the wire, which `buf breaking` must refuse."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from conftest import DEADLINE, ROOT, VENV_BIN

BUF = str(Path(VENV_BIN) / "buf")


def buf(*args, cwd=ROOT):
    return subprocess.run([BUF, *args], cwd=cwd, capture_output=True, text=True, timeout=DEADLINE, stdin=subprocess.DEVNULL)


def test_the_proto_passes_buf_lint_and_breaking():
    """The proto as it is: lint-clean, and wire-compatible with the baseline."""
    lint = buf("lint")
    assert lint.returncode == 0, lint.stdout + lint.stderr
    breaking = buf("breaking", "--against", "proto/baseline.binpb")
    assert breaking.returncode == 0, breaking.stdout + breaking.stderr


def test_a_wire_breaking_change_is_refused(tmp_path):
    """The check can fail: the proto with one field's number changed (what
    a careless rename could do) is refused by `buf breaking`."""
    shutil.copy(ROOT / "buf.yaml", tmp_path / "buf.yaml")
    proto = tmp_path / "proto/embedder/v1/embedder.proto"
    proto.parent.mkdir(parents=True)
    text = (ROOT / "proto/embedder/v1/embedder.proto").read_text()
    assert "uint32 dropped_tokens = 4;" in text
    proto.write_text(text.replace("uint32 dropped_tokens = 4;", "uint32 dropped_tokens = 40;"))
    breaking = buf("breaking", "--against", str(ROOT / "proto/baseline.binpb"), cwd=tmp_path)
    assert breaking.returncode != 0, breaking.stdout
    assert "dropped_tokens" in breaking.stdout or "4" in breaking.stdout, breaking.stdout
