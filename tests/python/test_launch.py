"""The suite does not depend on how it was launched. A job started in the
background by a non-interactive shell (`make test &`, `nohup make test`, CI)
inherits SIGINT and SIGQUIT ignored (nohup adds SIGHUP), may have no stdin
and no terminal, and may run from another directory. The tests that signal
processes run here under exactly those conditions, and must pass."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from conftest import DEADLINE, ROOT, VENV_BIN

IGNORED = (signal.SIGINT, signal.SIGQUIT, signal.SIGHUP)


# What `nohup cmd &` from a script gives a process: a session of its own
# (no controlling terminal) and SIGINT, SIGQUIT and SIGHUP ignored. Set by a
# trampoline that execs the command (no preexec_fn: no Python code between
# fork and exec beside grpcio's threads).
AS_A_BACKGROUND_JOB = [
    sys.executable, "-c",
    "import os, signal, sys\n"
    f"for sig in {[int(s) for s in IGNORED]}: signal.signal(sig, signal.SIG_IGN)\n"
    "os.execvp(sys.argv[1], sys.argv[1:])\n",
]


def ignored_signals(pid):
    """The signals process `pid` ignores (from /proc/PID/status SigIgn)."""
    status = Path(f"/proc/{pid}/status").read_text()
    mask = int(next(l.split()[1] for l in status.splitlines() if l.startswith("SigIgn:")), 16)
    return {sig for sig in signal.Signals if mask & (1 << (sig - 1))}


def run_as_a_background_job(args, timeout):
    return subprocess.run(
        [*AS_A_BACKGROUND_JOB, *args], cwd="/", stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=timeout, start_new_session=True, env={**os.environ, "CI": "true", "TERM": "dumb"},
    )


def test_children_start_with_default_signals_whatever_the_suite_inherited(server):
    """Under a background job's signal dispositions, a Go program (grpcurl)
    started plainly keeps SIGINT ignored (so an interrupt does nothing: the
    failure this suite once had); once conftest is imported, the process
    still ignores it and a child started by conftest.spawn has it back at
    the default."""
    script = (
        "import subprocess, sys, json\n"
        "args = [sys.argv[1], '-plaintext', '-d', '@', sys.argv[3], 'embedder.v1.Embedder/Converse']\n"
        "plain = subprocess.Popen(args, stdin=subprocess.PIPE)\n"
        "sys.path.insert(0, sys.argv[2])\n"
        "from conftest import spawn\n"
        "spawned = spawn(args, stdin=subprocess.PIPE)\n"
        "print(json.dumps([plain.pid, spawned.pid]), flush=True)\n"
        "sys.stdin.readline()\n"
        "plain.kill(); spawned.kill()\n"
    )
    parent = subprocess.Popen(
        [*AS_A_BACKGROUND_JOB, sys.executable, "-c", script, str(Path(VENV_BIN) / "grpcurl"),
         str(ROOT / "tests/python"), server.addr],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, start_new_session=True,
    )
    try:
        import json  # noqa: PLC0415

        plain, spawned = json.loads(parent.stdout.readline())
        assert signal.SIGINT in ignored_signals(plain), "a plain child keeps SIGINT ignored (the condition is real)"
        assert not ignored_signals(spawned) & set(IGNORED), "a spawned child has the defaults back"
        # The suite's own process still ignores them: a stray Ctrl-C in
        # the shell that started it in the background does not stop it.
        os.kill(parent.pid, signal.SIGINT)
        os.kill(parent.pid, signal.SIGHUP)
    finally:
        parent.communicate("\n", timeout=DEADLINE)
    assert parent.returncode == 0, "SIGINT and SIGHUP did nothing to the suite's process"


def test_signal_dependent_python_tests_pass_as_a_background_job():
    """The Python tests that interrupt or kill client processes (grpcurl's
    Ctrl-C, SIGKILLed grpcio clients) pass as a background job with no
    stdin, no terminal, CI=true and another working directory."""
    out = run_as_a_background_job(
        [sys.executable, "-m", "pytest", str(ROOT / "tests/python/test_sessions.py"),
         str(ROOT / "tests/python/test_metrics.py"), "-q", "-p", "no:cacheprovider"],
        timeout=600,
    )
    print(out.stdout[-2000:], out.stderr[-2000:])
    assert out.returncode == 0, out.stdout[-4000:]
    assert " passed" in out.stdout and "failed" not in out.stdout


def test_signal_dependent_rust_tests_pass_as_a_background_job():
    """The Rust tests that signal the server process (SIGTERM drains, SIGHUP
    reloads tokens) pass as a background job too: the server must handle
    the signals it was started with ignored (`nohup` ignores SIGHUP)."""
    cargo = os.environ.get("CARGO") or shutil.which("cargo") or str(Path.home() / ".cargo/bin/cargo")
    out = run_as_a_background_job(
        [cargo, "test", "--manifest-path", str(ROOT / "Cargo.toml"), "--features", "faults", "--test", "it", "--",
         "shutdown_drains", "json_logs", "tls_and_bearer", "a_dead_engine"],
        timeout=1200,
    )
    print(out.stdout[-3000:], out.stderr[-2000:])
    assert out.returncode == 0, out.stdout[-4000:] + out.stderr[-4000:]
    assert "test result: ok. 4 passed" in out.stdout, out.stdout[-2000:]
