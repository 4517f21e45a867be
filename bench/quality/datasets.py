"""Retrieval sets for `make quality`, built from code already on the machine.

docstring -> code pairs:
  python   functions with a docstring in the Python standard library of the
           interpreter running this (site-packages left out);
  rust     `///`-documented functions of the crates in the cargo registry
           (one version per crate: the newest);
  heldout  functions with a docstring in the third-party Python packages
           installed in .venv (never used for fitting anything).
The query is the docstring's first sentence; the document is the function
with its docstring (or doc comment) removed. Every pair is assigned to the
"fit" or the "eval" part by a hash of its file's path, so the two parts never
share a file; sampling is deterministic (sorted, seeded).

Conversations are built from eval-part functions (see `conversations`).
"""

from __future__ import annotations

import ast
import hashlib
import os
import re
import sysconfig
import textwrap
from dataclasses import dataclass
from pathlib import Path

SEED = 20261202


@dataclass(frozen=True)
class Pair:
    query: str
    doc: str
    file: str  # relative to its root, identifies the split
    part: str  # "fit" or "eval"


def part_of(file: str) -> str:
    """Half the files fit, half evaluate, by a stable hash of the path."""
    h = int.from_bytes(hashlib.sha256(file.encode()).digest()[:4], "little")
    return "fit" if h % 2 == 0 else "eval"


_SENTENCE = re.compile(r"^(.*?[.!?])(\s|$)", re.S)


def first_sentence(doc: str) -> str | None:
    """The first sentence of a docstring, if it is a usable query."""
    para = doc.strip().split("\n\n")[0]
    para = " ".join(line.strip() for line in para.splitlines())
    m = _SENTENCE.match(para)
    s = (m.group(1) if m else para).strip()
    words = s.split()
    if len(words) < 4 or len(words) > 40:
        return None
    if s.lower().startswith(("deprecated", "todo", "see ", "same as", "alias", "internal", "helper")):
        return None
    return s


def python_pairs(root: Path, skip_dirs: tuple[str, ...] = ()) -> list[Pair]:
    pairs = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if any(part in skip_dirs for part in path.relative_to(root).parts):
            continue
        try:
            src = path.read_text(encoding="utf-8")
            tree = ast.parse(src)
        except (SyntaxError, UnicodeDecodeError, ValueError, RecursionError):
            continue
        lines = src.splitlines()
        for node in ast.walk(tree):
            if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            doc = ast.get_docstring(node, clean=True)
            if not doc or not node.body or node.end_lineno is None:
                continue
            query = first_sentence(doc)
            if query is None:
                continue
            ds = node.body[0]
            start = min([d.lineno for d in node.decorator_list] + [node.lineno])
            body = lines[start - 1 : ds.lineno - 1] + lines[ds.end_lineno : node.end_lineno]
            code = textwrap.dedent("\n".join(body)).strip("\n")
            n_lines = sum(1 for line in code.splitlines() if line.strip())
            if n_lines < 3 or n_lines > 40:
                continue
            pairs.append(Pair(query, code, rel, part_of(rel)))
    return pairs


_FN = re.compile(r"^\s*(pub(\([^)]*\))?\s+)?(const\s+)?(async\s+)?(unsafe\s+)?(extern\s+\"[^\"]*\"\s+)?fn\s+\w+")


def _rust_function(lines: list[str], i: int) -> tuple[str, int] | None:
    """The function starting at line i (brace-matched), and the line after it."""
    depth, seen, out = 0, False, []
    for j in range(i, min(len(lines), i + 60)):
        line = lines[j]
        out.append(line)
        stripped = re.sub(r"'(\\.|[^'\\])'|\"(\\.|[^\"\\])*\"|//.*$", "", line)
        for ch in stripped:
            if ch == "{":
                depth += 1
                seen = True
            elif ch == "}":
                depth -= 1
        if not seen and stripped.rstrip().endswith(";"):
            return None  # a declaration (trait method without a body)
        if seen and depth == 0:
            return "\n".join(out), j + 1
    return None


def rust_pairs(registry: Path) -> list[Pair]:
    crates: dict[str, Path] = {}
    for d in sorted(registry.glob("*/*")):
        m = re.match(r"^(.*)-(\d+)\.(\d+)\.(\d+).*$", d.name)
        if not m or not d.is_dir():
            continue
        name, ver = m.group(1), tuple(int(x) for x in m.group(2, 3, 4))
        if name not in crates or ver > crates[name][0]:
            crates[name] = (ver, d)
    pairs = []
    for name in sorted(crates):
        root = crates[name][1]
        for path in sorted(root.rglob("*.rs")):
            rel = f"{name}/{path.relative_to(root).as_posix()}"
            if "/tests/" in f"/{rel}" or "/benches/" in f"/{rel}" or "/examples/" in f"/{rel}":
                continue
            try:
                lines = path.read_text(encoding="utf-8").splitlines()
            except (UnicodeDecodeError, OSError):
                continue
            i = 0
            while i < len(lines):
                if not lines[i].lstrip().startswith("///"):
                    i += 1
                    continue
                doc = []
                while i < len(lines) and lines[i].lstrip().startswith("///"):
                    doc.append(lines[i].lstrip()[3:].strip())
                    i += 1
                while i < len(lines) and lines[i].lstrip().startswith("#["):
                    i += 1
                if i >= len(lines) or not _FN.match(lines[i]):
                    continue
                got = _rust_function(lines, i)
                if got is None:
                    i += 1
                    continue
                code, nxt = got
                query = first_sentence("\n".join(doc))
                code = textwrap.dedent(code).strip("\n")
                n_lines = code.count("\n") + 1
                if query and 3 <= n_lines <= 40 and "///" not in code:
                    pairs.append(Pair(query, code, rel, part_of(rel)))
                i = nxt
    return pairs


def dedupe(pairs: list[Pair]) -> list[Pair]:
    """One pair per query text and per document text (first in file order)."""
    seen_q, seen_d, out = set(), set(), []
    for p in pairs:
        qk, dk = p.query.lower(), p.doc
        if qk in seen_q or dk in seen_d:
            continue
        seen_q.add(qk)
        seen_d.add(dk)
        out.append(p)
    return out


def sample(pairs: list[Pair], part: str, n: int, seed: int = SEED) -> list[Pair]:
    """n pairs of `part`, the first by a seeded hash of each pair's file and
    query: deterministic, and stable when pairs come or go elsewhere (a new
    crate in the cargo registry adds only the pairs it brings, instead of
    reshuffling every sample)."""

    def key(p: Pair) -> bytes:
        return hashlib.sha256(f"{seed}\0{p.file}\0{p.query}".encode()).digest()

    return sorted((p for p in pairs if p.part == part), key=key)[:n]


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def registry_root() -> Path:
    home = Path(os.environ.get("CARGO_HOME", Path.home() / ".cargo"))
    return home / "registry" / "src"


def venv_site(venv: Path) -> Path | None:
    for p in sorted(venv.glob("lib/python*/site-packages")):
        return p
    return None


STDLIB_SKIP = ("site-packages", "test", "tests", "idlelib", "lib2to3", "turtledemo", "__pycache__")
HELDOUT_PACKAGES = ("numpy", "onnx", "grpc", "gguf", "google", "_pytest", "pip", "tokenizers", "onnxruntime")


def all_sets() -> dict[str, list[Pair]]:
    sets = {
        "python": dedupe(python_pairs(stdlib_root(), STDLIB_SKIP)),
        "rust": dedupe(rust_pairs(registry_root())),
    }
    site = venv_site(Path(__file__).resolve().parents[2] / ".venv")
    if site is not None:
        held = []
        for pkg in HELDOUT_PACKAGES:
            if (site / pkg).is_dir():
                for p in python_pairs(site / pkg, ("tests", "test", "testing", "__pycache__", "_vendor")):
                    held.append(Pair(p.query, p.doc, f"{pkg}/{p.file}", "eval"))
        sets["heldout"] = dedupe(held)
    return sets


# Conversations: turn 1 the code, later turns follow-up requests that are the
# same in every conversation, so that only the state tells them apart.
FOLLOW_UPS = [
    "Can you add type annotations and make the names clearer?",
    "Now write a unit test for it.",
    "Explain any edge cases it does not handle.",
]

# A long shared preamble and a long shared follow-up: in the long set, the
# code (the only telling detail) sits more than 300 tokens before the end,
# after a preamble longer than a 256-token model sees.
PREAMBLE = (
    "You are a senior software engineer doing code review for a large team. "
    "Follow the team's review checklist carefully. Check that every public function has "
    "documentation that explains its arguments, its return value and the errors it can raise; "
    "that names are descriptive and consistent with the surrounding module; that there is no "
    "duplicated logic that could be shared; that errors are handled rather than silently ignored; "
    "that resources such as files, sockets and locks are released on every path, including the "
    "error paths; that the code has no hidden global state and no surprising side effects; that "
    "inputs from users or from the network are validated before use; that loops terminate and "
    "recursion is bounded; that the complexity is reasonable for the expected input sizes; that "
    "the tests cover the normal cases, the edge cases and the failure cases; that there are no "
    "commented-out blocks of code or leftover debugging output; that the formatting follows the "
    "project's style guide; that logging is useful and does not leak secrets; that configuration "
    "values are not hard-coded; that concurrency is handled with care, with no data races and no "
    "deadlocks; that public interfaces are stable and backwards compatible; and that every change "
    "is small enough to review in one sitting. When you answer, be concise and specific, quote the "
    "lines you are talking about, and suggest a concrete fix for every problem you find. "
    "Some background on how we work. Our team is spread over several time zones, so reviews are "
    "asynchronous and a review comment has to make sense without a meeting. We prefer comments "
    "that explain why something matters over comments that only say what to change. We mark each "
    "comment as blocking or as a suggestion, and we never block a change on a matter of taste. "
    "Reviewers are expected to run the code when the change is not obvious, to read the tests "
    "before the implementation, and to check that the change does what its description says and "
    "nothing more. When a change touches an area you do not know well, say so, and ask someone who "
    "does to review it too. Keep in mind that the author may be new to the codebase: be kind, be "
    "precise, and point to the documentation or to an existing example when there is one. Avoid "
    "rewriting the author's code in your own style; propose the smallest change that fixes the "
    "problem. If you find a problem that is older than the change, note it separately instead of "
    "asking the author to fix it in the same change. Finally, approve the change once the blocking "
    "comments are resolved, even if some suggestions remain open. "
    "The developer will now paste the code to review."
)
LONG_FOLLOW_UP = (
    "Thanks. Before you answer, here is some more context about our project. We are migrating a "
    "monolithic service to smaller components, and we care a lot about readability, because many "
    "people with different backgrounds maintain this code over many years. We run continuous "
    "integration on every change, with linters, formatters, unit tests, integration tests and a "
    "small set of end-to-end tests; a change only lands when all of them pass. We deploy several "
    "times a day, so we prefer small, safe changes over large rewrites, and we like changes that "
    "come with a way to roll them back. Our on-call engineers need clear error messages and logs "
    "that explain what went wrong without exposing private data. We also have performance budgets "
    "for the hot paths, measured by benchmarks that run nightly, and memory limits in production. "
    "Some of our users run old versions of our clients, so we cannot change the wire format "
    "without a migration plan. Our documentation is generated from the code comments, so the "
    "comments must stay true whenever the code changes. We review security-sensitive changes "
    "twice, and we keep a changelog that the release manager reads before every release. "
    "With all of that in mind, please list the three most important improvements you would make, "
    "in order of priority, and say for each one how you would test it, how you would roll it "
    "out safely, and how you would know in production that it worked as intended."
)


@dataclass(frozen=True)
class Conversation:
    query: str
    turns: list[tuple[str, str]]  # (role, text)
    file: str


def conversations(pairs: list[Pair], kind: str, n: int, seed: int = SEED, part: str = "eval") -> list[Conversation]:
    """Conversations over `part` functions (the evaluation part unless
    said). kind: two_turn, multi_turn, long."""
    chosen = sample(pairs, part, n, seed + {"two_turn": 1, "multi_turn": 2, "long": 3}[kind])
    out = []
    for p in chosen:
        code_turn = ("user", f"Here is a function from my project:\n{p.doc}")
        if kind == "two_turn":
            turns = [code_turn, ("user", FOLLOW_UPS[0])]
        elif kind == "multi_turn":
            turns = [code_turn] + [("user", f) for f in FOLLOW_UPS]
        else:
            turns = [("system", PREAMBLE), code_turn, ("user", LONG_FOLLOW_UP)]
        out.append(Conversation(p.query, turns, p.file))
    return out
