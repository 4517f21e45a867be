"""Conversations that outlive their replica: resumable sessions in a real
Valkey server (started by the tests, `conftest.Valkey`), shared by two
server processes. A replica killed with SIGKILL, a rolling restart with the
Python client resuming by itself, the store stopped and restarted, tokens,
held sessions and bad data in the store. Every turn is checked against the
unbroken conversation's embedding (computed by a non-resumable stream over
the same turns: the oracle the Rust suite holds, over the wire)."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import grpc
import numpy as np
import pytest
from conftest import DEADLINE, GEN, ROOT, VENV_BIN, Lines, Server, TlsTerminator, Valkey, free_port, spawn, wait_stats

sys.path.insert(0, str(ROOT / "clients/python"))

# The tiny model's turns are exact over the wire in f32 (the Rust oracle
# suites): a resumed conversation's turn equals the unbroken one's to within
# the rounding a batched call may add (measured ≤ 3e-7 on the real model).
TOLERANCE = 1e-5

LEASE = "3"  # seconds: a crashed replica's sessions are resumable within this


def serve(valkey, *extra, addr="127.0.0.1:0", log=None, url=None, env=None):
    return Server("--session-store", url or valkey.url, "--session-lease-seconds", LEASE, *extra, addr=addr, log=log,
                  env=env)


def texts(conversation, n):
    return [f"conversation {conversation} turn {t}: def f{conversation}_{t}(x): return x * {t} + {conversation}"
            for t in range(n)]


def unbroken(pb, addr, turns):
    """Each turn's vector in one non-resumable stream (the oracle over the wire)."""
    pb2, rpc = pb
    with grpc.insecure_channel(addr) as ch:
        out = list(rpc.EmbedderStub(ch).Converse(
            iter([pb2.ConverseRequest(turn=pb2.Turn(text=t, role="user")) for t in turns]), timeout=DEADLINE))
    return [np.array(r.embedding.values, dtype=np.float32) for r in out]


def close(got, want):
    return float(np.abs(np.array(got, dtype=np.float32) - want).max()) <= TOLERANCE


class Stream:
    """A Converse stream whose requests are sent one at a time."""

    def __init__(self, pb, addr, metadata=None):
        import queue  # noqa: PLC0415

        self.pb2, rpc = pb
        self.q = queue.Queue()
        self.channel = grpc.insecure_channel(addr, options=[("grpc.use_local_subchannel_pool", 1)])

        def requests():
            while True:
                r = self.q.get()
                if r is None:
                    return
                yield r

        self.responses = rpc.EmbedderStub(self.channel).Converse(requests(), metadata=metadata, timeout=DEADLINE)

    def ask(self, **action):
        self.q.put(self.pb2.ConverseRequest(**action))
        return next(self.responses)

    def turn(self, text):
        return self.ask(turn=self.pb2.Turn(text=text, role="user"))

    def options(self, **o):
        return self.ask(options=self.pb2.SessionOptions(**o))

    def close(self):
        self.q.put(None)
        list(self.responses)
        self.channel.close()


def test_a_replica_killed_mid_conversation_is_resumed_on_another(pb, valkey):
    """Six turns: three on replica A, A killed with SIGKILL, the session
    resumed on B within the lease (3 s) with its context and turn count, and
    turns 4-6 equal to the unbroken conversation's."""
    pb2, _ = pb
    a, b = serve(valkey), serve(valkey)
    try:
        turns = texts(0, 6)
        want = unbroken(pb, b.addr, turns)
        s = Stream(pb, a.addr)
        assert s.options(session_mode=pb2.SESSION_MODE_CREATE, session_id="crash-1").ready.session_id == "crash-1"
        context = 0
        for i in range(3):
            e = s.turn(turns[i]).embedding
            assert close(e.values, want[i]), f"turn {i} on A"
            context = e.context_tokens
        # The store tells when A's lease key expires (a keyspace event).
        store = valkey.client()
        store.config_set("notify-keyspace-events", "Ex")
        expired = store.pubsub(ignore_subscribe_messages=True)
        expired.subscribe("__keyevent@0__:expired")
        a.signal(signal.SIGKILL)
        a.wait_exit()
        killed = time.monotonic()
        # B cannot take it while A's lease runs; once the lease has expired, it can.
        r = Stream(pb, b.addr)
        ready = r.options(session_mode=pb2.SESSION_MODE_RESUME, session_id="crash-1")
        if ready.WhichOneof("result") != "ready":
            assert ready.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0], ready
            r.close()
            deadline = killed + float(LEASE) + DEADLINE
            while True:
                left = deadline - time.monotonic()
                assert left > 0, "A's lease never expired"
                event = expired.get_message(timeout=left)
                if event is not None and event["data"] == b"se:{crash-1}:lease":
                    break
            r = Stream(pb, b.addr)
            ready = r.options(session_mode=pb2.SESSION_MODE_RESUME, session_id="crash-1")
            assert ready.WhichOneof("result") == "ready", f"refused after the lease expired: {ready}"
        else:
            # Only a machine slower than the lease gets here: the lease is gone.
            assert not store.exists("se:{crash-1}:lease"), "resumed while A's lease ran"
        expired.close()
        waited = time.monotonic() - killed
        print(f"\nresumed on B {waited:.2f} s after A's SIGKILL (lease {LEASE} s)")
        assert (ready.ready.turns, ready.ready.context_tokens) == (3, context)
        assert close(ready.ready.last_embedding.values, want[2]), "the last answer kept"
        for i in range(3, 6):
            e = r.turn(turns[i]).embedding
            assert close(e.values, want[i]), f"turn {i} on B after the resume"
        # The bound's broken cases: a resume that lost the whole context, or
        # only its last turn, would fail it.
        lost_all = unbroken(pb, b.addr, turns[3:4])[0]
        lost_one = unbroken(pb, b.addr, turns[:2] + turns[3:4])[-1]
        assert not close(lost_all, want[3]) and not close(lost_one, want[3])
        print(f"a lost context deviates {np.abs(lost_all - want[3]).max():.1e}, a lost turn "
              f"{np.abs(lost_one - want[3]).max():.1e} (bound {TOLERANCE:.0e})")
        r.close()
        assert valkey.keys("se:{crash-1}*") == [], "the half-close ended it in the store"
    finally:
        a.stop()
        b.stop()


def test_a_rolling_restart_loses_no_conversation(pb, valkey, tmp_path):
    """Forty conversations over A and B through the Python client that
    resumes by itself; A drained (SIGTERM: its sessions handed off at once)
    and restarted, then B drained while turns are in flight, and restarted:
    every turn of every conversation equals its unbroken oracle, none lost or
    answered twice, and once every conversation half-closes the store holds
    no key of theirs."""
    from resumable import ResumableConversation  # noqa: PLC0415

    pb2, _ = pb
    sys.path.insert(0, str(GEN))
    ports = [free_port(), free_port()]
    addrs = [f"127.0.0.1:{p}" for p in ports]
    log = tmp_path / "servers.log"
    servers = [serve(valkey, addr=addrs[0], log=log), serve(valkey, addr=addrs[1], log=log)]
    n, per_phase = 40, 2
    turns = {c: texts(c, 3 * per_phase) for c in range(n)}
    want = {c: unbroken(pb, addrs[c % 2], turns[c]) for c in range(n)}
    got = {c: [] for c in range(n)}
    conversations = {}
    errors = []

    def talk(c, phase):
        try:
            if c not in conversations:
                # Spread over the two replicas: each starts on its own.
                conversations[c] = ResumableConversation([addrs[c % 2], addrs[(c + 1) % 2]],
                                                         session_id=f"rolling-{c}", give_up_after=DEADLINE)
            for t in range(phase * per_phase, (phase + 1) * per_phase):
                got[c].append(np.array(conversations[c].turn(turns[c][t]).values, dtype=np.float32))
        except Exception as e:  # noqa: BLE001
            errors.append((c, repr(e)))

    def phase(p):
        threads = [threading.Thread(target=talk, args=(c, p)) for c in range(n)]
        for t in threads:
            t.start()
        return threads

    def join(threads):
        for t in threads:
            t.join(timeout=DEADLINE * 3)
            assert not t.is_alive(), "a conversation hung"
        assert not errors, errors

    def restart(i):
        servers[i].signal(signal.SIGTERM)
        started = time.monotonic()
        assert servers[i].wait_exit() == 0
        took = time.monotonic() - started
        servers[i] = serve(valkey, addr=addrs[i], log=log)
        return took

    try:
        join(phase(0))
        drain_a = restart(0)
        join(phase(1))
        threads = phase(2)  # B drains while these turns run
        drain_b = restart(1)
        join(threads)
        resumes = sum(c.resumes for c in conversations.values())
        worst = max(float(np.abs(g - w).max()) for c in range(n) for g, w in zip(got[c], want[c]))
        print(f"\n{n} conversations, {sum(len(g) for g in got.values())} turns, {resumes} resumes; "
              f"drains took {drain_a:.2f} s and {drain_b:.2f} s; worst deviation from the oracle {worst:.1e}")
        for c in range(n):
            assert len(got[c]) == len(turns[c]), f"conversation {c}: {len(got[c])} answers"
            assert conversations[c].turns == len(turns[c]), "each turn in the conversation exactly once"
        assert worst <= TOLERANCE
        assert resumes >= n // 2, f"the drains handed conversations off ({resumes} resumes)"
        assert drain_a < 10 and drain_b < 10, "hand-offs end the drain in seconds, not --drain-seconds"
        for c in conversations.values():
            c.close()
        assert valkey.keys("se:{rolling-*") == [], valkey.keys("se:{rolling-*")
    finally:
        for s in servers:
            s.stop()


def test_the_store_stopped_fails_turns_in_band_and_loses_nothing(pb, valkey):
    """Valkey stopped mid-conversation: the session's turn is an in-band
    UNAVAILABLE, the conversation unchanged; a non-resumable stream and
    health go on, GetStats says the store is down. Valkey restarted (its
    append-only file on): the same stream's next turn succeeds and equals
    the unbroken conversation's."""
    pb2, rpc = pb
    a = serve(valkey, "--session-store-timeout-seconds", "1")
    try:
        turns = texts(1, 2)
        want = unbroken(pb, a.addr, turns)
        s = Stream(pb, a.addr)
        s.options(session_mode=pb2.SESSION_MODE_CREATE, session_id="outage-1")
        first = s.turn(turns[0]).embedding
        assert close(first.values, want[0])
        valkey.stop()
        failed = s.turn(turns[1])
        assert failed.WhichOneof("result") == "error", failed
        assert failed.error.code == grpc.StatusCode.UNAVAILABLE.value[0], failed
        assert "unchanged" in failed.error.message
        stats = a.stats(pb, lambda st: not st.session_store_up, "the store seen down")
        assert stats.session_store_errors_total >= 1
        plain = unbroken(pb, a.addr, turns[:1])  # a non-resumable stream is untouched
        assert close(plain[0], want[0])
        valkey.start()
        again = s.turn(turns[1]).embedding
        assert close(again.values, want[1]), "the failed turn changed nothing"
        assert again.context_tokens == first.context_tokens + again.turn_tokens
        a.stats(pb, lambda st: st.session_store_up, "the store seen up again")
        s.close()
    finally:
        a.stop()


def test_sessions_are_bound_to_their_token_and_held_across_replicas(pb, valkey, tmp_path):
    """A session created on A with one token cannot be resumed on B with
    another (NOT_FOUND, as if it did not exist); the store holds no token,
    only its hash; a session held on A cannot be taken from B while A holds
    it (FAILED_PRECONDITION)."""
    pb2, _ = pb
    tokens = tmp_path / "tokens"
    tokens.write_text("token-of-alice-3f9a\ntoken-of-bob-77c1\n")
    a = serve(valkey, "--auth-token-file", str(tokens))
    b = serve(valkey, "--auth-token-file", str(tokens))
    alice = [("authorization", "Bearer token-of-alice-3f9a")]
    bob = [("authorization", "Bearer token-of-bob-77c1")]
    try:
        s = Stream(pb, a.addr, alice)
        assert s.options(session_mode=pb2.SESSION_MODE_CREATE, session_id="owned-2").ready.session_id == "owned-2"
        assert s.turn("a turn of alice's").WhichOneof("result") == "embedding"
        held = Stream(pb, b.addr, alice).options(session_mode=pb2.SESSION_MODE_RESUME, session_id="owned-2")
        assert held.error.code == grpc.StatusCode.FAILED_PRECONDITION.value[0], held
        stored = b"".join(v for k in valkey.client().keys("se:*") for v in
                          (valkey.client().hvals(k) if valkey.client().type(k) == b"hash" else [valkey.client().get(k)]))
        assert b"token-of-alice" not in stored and b"token-of" not in stored, "the store holds no token"
        s.channel.close()  # lost, not half-closed: detached
        wait_stats(*_stub(pb, a.addr, alice), lambda st: st.open_streams == 0, "A's stream gone")
        other = Stream(pb, b.addr, bob).options(session_mode=pb2.SESSION_MODE_RESUME, session_id="owned-2")
        assert other.error.code == grpc.StatusCode.NOT_FOUND.value[0], other
        mine = Stream(pb, b.addr, alice)
        assert mine.options(session_mode=pb2.SESSION_MODE_RESUME, session_id="owned-2").ready.turns == 1
        mine.close()
    finally:
        a.stop()
        b.stop()


def _stub(pb, addr, metadata):
    pb2, rpc = pb
    channel = grpc.insecure_channel(addr)

    class WithToken:
        def GetStats(self, request, timeout):  # noqa: N802
            return rpc.EmbedderStub(channel).GetStats(request, timeout=timeout, metadata=metadata)

    return WithToken(), pb2


def test_bad_data_in_the_store_fails_that_session_only(pb, valkey):
    """A truncated token list, a foreign value (a hash that is not a
    session's, a key of another type) and a newer format in the store:
    resuming each is a clear DATA_LOSS for that session only; a good
    session beside them resumes."""
    pb2, _ = pb
    a = serve(valkey)
    try:
        s = Stream(pb, a.addr)
        s.options(session_mode=pb2.SESSION_MODE_CREATE, session_id="good-1")
        s.turn("a good session's turn")
        s.channel.close()
        a.stats(pb, lambda st: st.open_streams == 0, "detached")
        r = valkey.client()
        meta = json.loads(r.hget("se:{good-1}:state", "meta"))
        tokens = r.hget("se:{good-1}:state", "tokens")
        r.hset("se:{bad-truncated}:state", mapping={"meta": json.dumps(meta), "tokens": tokens[:-2], "last": b""})
        r.hset("se:{bad-foreign}:state", mapping={"meta": json.dumps({"version": 1, "who": "someone else"}), "tokens": b""})
        r.hset("se:{bad-future}:state", mapping={"meta": json.dumps({**meta, "version": 99}), "tokens": tokens, "last": b""})
        r.set("se:{bad-type}:state", "someone else's string")
        for id_, says in [("bad-truncated", "bytes of token ids"), ("bad-foreign", "not a session"),
                          ("bad-type", "holds a string, not a session"), ("bad-future", "newer")]:
            answer = Stream(pb, a.addr).options(session_mode=pb2.SESSION_MODE_RESUME, session_id=id_)
            assert answer.error.code == grpc.StatusCode.DATA_LOSS.value[0], (id_, answer)
            assert says in answer.error.message, (id_, answer.error.message)
            assert id_ in answer.error.message
        good = Stream(pb, a.addr)
        assert good.options(session_mode=pb2.SESSION_MODE_RESUME, session_id="good-1").ready.turns == 1
        good.close()
    finally:
        a.stop()


def test_the_node_client_resumes_through_a_drain_and_a_crash(pb, valkey):
    """The Node.js client (clients/node, @grpc/grpc-js) in a second
    language: two turns on A, A drained (its idle session handed off at
    once), two on B, B killed with SIGKILL (A restarted meanwhile), two more
    on A once B's lease lapses: two resumes, each turn equal to the unbroken
    conversation's, and its half-close ends the session in the store."""
    turns = texts(7, 6)
    a, b = serve(valkey), serve(valkey)
    node = spawn([str(VENV_BIN / "node"), str(ROOT / "tests/node/conversation.js"), "node-1", a.addr, b.addr],
                 stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    lines = Lines(node.stdout)

    def ask(command):
        node.stdin.write(json.dumps(command) + "\n")
        node.stdin.flush()
        answer = json.loads(lines.next())
        assert "error" not in answer, answer
        return answer

    try:
        want = unbroken(pb, b.addr, turns)
        assert json.loads(lines.next()) == {"ready": "node-1"}
        got = [ask({"turn": t}) for t in turns[:2]]
        a.signal(signal.SIGTERM)
        assert a.wait_exit() == 0
        got += [ask({"turn": t}) for t in turns[2:4]]
        a = serve(valkey, addr=a.addr)
        b.signal(signal.SIGKILL)
        b.wait_exit()
        got += [ask({"turn": t}) for t in turns[4:]]
        for i, (g, w) in enumerate(zip(got, want)):
            assert close(g["values"], w), f"turn {i}"
        assert [g["turns"] for g in got] == [1, 2, 3, 4, 5, 6]
        assert [g["resumes"] for g in got] == [0, 0, 1, 1, 2, 2]
        assert ask({"close": True}) == {"closed": True}
        assert node.wait(timeout=DEADLINE) == 0
        assert valkey.keys("se:{node-1}*") == []
    finally:
        node.kill()
        a.stop()
        b.stop()


def test_a_store_behind_tls_with_a_password_from_a_file(pb, tmp_path):
    """`rediss://` to a store that wants a password, read from
    --session-store-password-file: the session is written through TLS (the
    server trusts the test CA through SSL_CERT_FILE); a wrong password fails
    CREATE in-band with UNAVAILABLE; the password is in no log line."""
    pb2, _ = pb
    password = "store-pw-81c2e6"
    valkey = Valkey(tmp_path, password=password)
    tls = TlsTerminator(valkey.port, tmp_path)
    right, wrong = tmp_path / "right", tmp_path / "wrong"
    right.write_text(password + "\n")
    wrong.write_text("not-the-password\n")
    log = tmp_path / "server.log"
    url = f"rediss://127.0.0.1:{tls.port}"
    env = {"SSL_CERT_FILE": str(tls.ca_file)}
    a = serve(valkey, "--session-store-password-file", str(right), url=url, env=env, log=log)
    b = serve(valkey, "--session-store-password-file", str(wrong), url=url, env=env, log=log)
    try:
        s = Stream(pb, a.addr)
        assert s.options(session_mode=pb2.SESSION_MODE_CREATE, session_id="tls-1").WhichOneof("result") == "ready"
        assert s.turn("a turn kept over TLS").WhichOneof("result") == "embedding"
        assert valkey.keys("se:{tls-1}*") == ["se:{tls-1}:lease", "se:{tls-1}:state"]
        assert tls.handshakes >= 1
        refused = Stream(pb, b.addr).options(session_mode=pb2.SESSION_MODE_CREATE, session_id="tls-2")
        assert refused.error.code == grpc.StatusCode.UNAVAILABLE.value[0], refused
        assert valkey.keys("se:{tls-2}*") == []
        s.close()
    finally:
        a.stop()
        b.stop()
        tls.close()
        valkey.stop()
    logged = log.read_text()
    assert "session store call failed" in logged, "the wrong password was logged as a failure"
    assert password not in logged and "not-the-password" not in logged
