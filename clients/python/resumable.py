"""A conversation that outlives its stream: a grpcio client of
embedder.v1.Embedder/Converse that resumes its session by itself.

The conversation is a resumable session (SESSION_MODE_CREATE). When its
stream fails with UNAVAILABLE (the replica drains and hands the session off,
or goes away) or the connection drops, the client opens a new stream with
SESSION_MODE_RESUME, on the next address of its list (or the same balancer),
with exponential backoff, and goes on: `ready.turns` says whether the turn in
flight made it in; if it did, its answer is `ready.last_embedding` (no turn
is sent twice); if not, it is sent again. Every turn is answered exactly
once, equal to an unbroken conversation's.

    # Stubs: python -m grpc_tools.protoc -Iproto --python_out=. --grpc_python_out=. proto/embedder/v1/embedder.proto
    conversation = ResumableConversation(["127.0.0.1:50051", "127.0.0.1:50052"])
    vector = conversation.turn("def add(a, b): return a + b").values
    conversation.close()  # a half-close: the session ends for good

It needs only grpcio and the generated stubs (`embedder.v1` on sys.path).
"""

from __future__ import annotations

import queue
import random
import threading
import time

import grpc
from embedder.v1 import embedder_pb2 as pb
from embedder.v1 import embedder_pb2_grpc as rpc

# The codes after which the session is worth resuming: the server is
# draining or gone (UNAVAILABLE), the stream was cut (CANCELLED by a proxy,
# UNKNOWN or INTERNAL for a reset), or the stream's deadline passed.
RESUMABLE = {
    grpc.StatusCode.UNAVAILABLE,
    grpc.StatusCode.CANCELLED,
    grpc.StatusCode.UNKNOWN,
    grpc.StatusCode.DEADLINE_EXCEEDED,
    grpc.StatusCode.INTERNAL,
}

CODES = {code.value[0]: code for code in grpc.StatusCode}


class SessionError(Exception):
    """The server refused the session or a turn for good (not retryable)."""

    def __init__(self, code, message):
        super().__init__(f"{code}: {message}")
        self.code = code


class _Stream:
    """One Converse stream whose requests are sent one at a time."""

    def __init__(self, stub, metadata, timeout):
        self._requests = queue.Queue()
        self._responses = stub.Converse(self._iterate(), metadata=metadata, timeout=timeout)

    def _iterate(self):
        while True:
            request = self._requests.get()
            if request is None:
                return
            yield request

    def ask(self, request):
        self._requests.put(request)
        return next(self._responses)

    def close(self):
        """Half-closes, and reads to the end (the server ends the session)."""
        self._requests.put(None)
        for _ in self._responses:
            pass

    def cancel(self):
        self._requests.put(None)
        self._responses.cancel()


class ResumableConversation:
    """A conversation in a resumable session (see the module docs)."""

    def __init__(self, addresses, options=None, session_id="", metadata=None, timeout=3600.0,
                 backoff=(0.05, 2.0), give_up_after=120.0, on_resume=None):
        self.addresses = [addresses] if isinstance(addresses, str) else list(addresses)
        self.metadata = list(metadata or [])
        self.timeout = timeout
        self.backoff = backoff
        self.give_up_after = give_up_after
        self.on_resume = on_resume  # called with (address, ready) after each resume
        self.resumes = 0
        self.turns = 0
        self._next = 0
        self._lock = threading.Lock()
        self._channel = None
        self._stream = None
        create = pb.SessionOptions()
        if options is not None:
            create.CopyFrom(options)
        create.session_mode = pb.SESSION_MODE_CREATE
        create.session_id = session_id
        ready = self._open(pb.ConverseRequest(options=create), resume=False)
        self.session_id = ready.session_id
        self.dimensions = ready.dimensions

    def _connect(self):
        address = self.addresses[self._next % len(self.addresses)]
        self._next += 1
        if self._channel is not None:
            self._channel.close()
        # A channel of its own (no subchannel shared with other channels of
        # this process), so that closing it closes its connection.
        self._channel = grpc.insecure_channel(address, options=[("grpc.use_local_subchannel_pool", 1)])
        self._stream = _Stream(rpc.EmbedderStub(self._channel), self.metadata, self.timeout)
        return address

    def _retry_or_raise(self, code, message, started, also=()):
        if code not in RESUMABLE and code not in also:
            raise SessionError(code, message)
        if time.monotonic() - started > self.give_up_after:
            raise SessionError(code, f"gave up after {self.give_up_after} s: {message}")

    def _open(self, first, resume):
        """Opens a stream whose first request is `first` (options); retries
        with backoff on the next address while the failure is retryable."""
        delay, started = self.backoff[0], time.monotonic()
        # On a resume the lost stream's lease may not have lapsed yet
        # (FAILED_PRECONDITION: held), as after a replica crashed.
        also = (grpc.StatusCode.FAILED_PRECONDITION,) if resume else ()
        while True:
            address = self._connect()
            try:
                response = self._stream.ask(first)
            except grpc.RpcError as e:
                self._retry_or_raise(e.code(), e.details(), started, also)
            else:
                if response.WhichOneof("result") == "ready":
                    if resume:
                        self.resumes += 1
                        if self.on_resume:
                            self.on_resume(address, response.ready)
                    return response.ready
                code = CODES[response.error.code]
                # In-band: UNAVAILABLE when the store is unreachable for a moment.
                self._retry_or_raise(code, response.error.message, started, also)
                self._stream.cancel()
            time.sleep(delay * (0.5 + random.random()))
            delay = min(delay * 2, self.backoff[1])

    def _resume(self):
        resume = pb.SessionOptions(session_mode=pb.SESSION_MODE_RESUME, session_id=self.session_id)
        return self._open(pb.ConverseRequest(options=resume), resume=True)

    def turn(self, text, role="user"):
        """The embedding of one more turn (pb.Embedding), resuming the
        session on another stream as often as needed; each turn is in the
        conversation exactly once."""
        with self._lock:
            request = pb.ConverseRequest(tag=f"turn-{self.turns}", turn=pb.Turn(text=text, role=role))
            started = time.monotonic()
            while True:
                try:
                    response = self._stream.ask(request)
                except (grpc.RpcError, StopIteration) as e:
                    if isinstance(e, grpc.RpcError):
                        self._retry_or_raise(e.code(), e.details(), started)
                    ready = self._resume()
                    if ready.turns == self.turns + 1:
                        # The turn made it in before the stream was lost: its answer is here.
                        self.turns += 1
                        return ready.last_embedding
                    if ready.turns != self.turns:
                        raise SessionError(grpc.StatusCode.DATA_LOSS,
                                           f"the session has {ready.turns} turns, this client {self.turns}")
                    continue
                if response.WhichOneof("result") == "embedding":
                    self.turns += 1
                    return response.embedding
                code = CODES[response.error.code]
                if code != grpc.StatusCode.UNAVAILABLE:
                    raise SessionError(code, response.error.message)
                # The store did not take the turn (the conversation is
                # unchanged), or this stream lost its hold on the session:
                # leave the stream and resume, then send the turn again.
                self._retry_or_raise(code, response.error.message, started)
                self._stream.cancel()
                ready = self._resume()
                if ready.turns != self.turns:
                    raise SessionError(grpc.StatusCode.DATA_LOSS,
                                       f"the session has {ready.turns} turns, this client {self.turns}")

    def close(self):
        """Ends the session for good: a half-close read to its end. If the
        stream was lost or handed off meanwhile, the session is resumed and
        that stream half-closed instead."""
        with self._lock:
            started = time.monotonic()
            try:
                while True:
                    try:
                        self._stream.close()
                        return
                    except grpc.RpcError as e:
                        self._retry_or_raise(e.code(), e.details(), started)
                    self._resume()
            finally:
                self._channel.close()

    def abandon(self):
        """Drops the stream without ending the session (it stays resumable)."""
        self._stream.cancel()
        self._channel.close()
