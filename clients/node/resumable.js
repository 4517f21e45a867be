'use strict';
// A conversation that outlives its stream: a Node.js (@grpc/grpc-js) client
// of embedder.v1.Embedder/Converse that resumes its session by itself, the
// twin of clients/python/resumable.py.
//
// The conversation is a resumable session (SESSION_MODE_CREATE). When its
// stream fails with UNAVAILABLE (the replica drains and hands the session
// off, or goes away) or the connection drops, the client opens a new stream
// with SESSION_MODE_RESUME on the next address of its list (or the same
// balancer), with exponential backoff, and goes on: `ready.turns` says
// whether the turn in flight made it in; if it did, its answer is
// `ready.last_embedding` (no turn is sent twice); if not, it is sent again.
// Every turn is answered exactly once, equal to an unbroken conversation's.
//
//   const { ResumableConversation } = require('./resumable');
//   const c = await ResumableConversation.open(['127.0.0.1:50051', '127.0.0.1:50052']);
//   const { values } = await c.turn('def add(a, b): return a + b');
//   await c.close(); // a half-close: the session ends for good

const path = require('node:path');
const grpc = require('@grpc/grpc-js');
const protoLoader = require('@grpc/proto-loader');

const PROTO = path.join(__dirname, '..', '..', 'proto', 'embedder', 'v1', 'embedder.proto');

// The Embedder service constructor from the proto (field names as in the
// proto, enums as their names, the oneof's case in `result`).
function loadEmbedder(protoPath = PROTO) {
  const definition = protoLoader.loadSync(protoPath, {
    keepCase: true, longs: Number, enums: String, defaults: true, oneofs: true,
  });
  return grpc.loadPackageDefinition(definition).embedder.v1.Embedder;
}

// The codes after which the session is worth resuming: the server is
// draining or gone (UNAVAILABLE), the stream was cut (CANCELLED by a proxy,
// UNKNOWN or INTERNAL for a reset), or the stream's deadline passed.
const RESUMABLE = new Set([
  grpc.status.UNAVAILABLE, grpc.status.CANCELLED, grpc.status.UNKNOWN,
  grpc.status.DEADLINE_EXCEEDED, grpc.status.INTERNAL,
]);

// The server refused the session or a turn for good (not retryable).
class SessionError extends Error {
  constructor(code, message) {
    super(`${grpc.status[code] ?? code}: ${message}`);
    this.code = code;
  }
}

// One Converse stream whose requests are sent one at a time.
class Stream {
  constructor(client, metadata, deadline) {
    this.call = client.Converse(metadata, { deadline });
    this.queued = [];
    this.waiting = [];
    this.ended = null;
    this.call.on('data', (response) => this.push({ response }));
    this.call.on('error', (error) => this.end(error));
    this.call.on('end', () => this.end(null));
  }

  push(item) {
    const waiter = this.waiting.shift();
    if (waiter) waiter(item); else this.queued.push(item);
  }

  end(error) {
    if (!this.ended) this.ended = { error };
    for (const waiter of this.waiting.splice(0)) waiter(this.ended);
  }

  next() {
    if (this.queued.length) return Promise.resolve(this.queued.shift());
    if (this.ended) return Promise.resolve(this.ended);
    return new Promise((resolve) => this.waiting.push(resolve));
  }

  // The answer to `request`; throws the stream's error if it ended first
  // (an end without a status error counts as UNAVAILABLE: resumable).
  async ask(request) {
    if (!this.ended) this.call.write(request);
    const item = await this.next();
    if (item.response) return item.response;
    throw item.error ?? Object.assign(new Error('the stream ended without an answer'), { code: grpc.status.UNAVAILABLE });
  }

  // Half-closes, and reads to the end (the server ends the session).
  async close() {
    this.call.end();
    for (;;) {
      const item = await this.next();
      if (item.response) continue;
      if (item.error) throw item.error;
      return;
    }
  }

  cancel() {
    this.call.cancel();
  }
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

class ResumableConversation {
  // Opens a conversation (SESSION_MODE_CREATE, retried on the next address
  // while the failure is retryable). `options`: SessionOptions fields;
  // `metadata`: [key, value] pairs (e.g. ['authorization', 'Bearer …']).
  static async open(addresses, {
    options = {}, sessionId = '', metadata = [], timeoutMs = 3_600_000,
    backoffMs = [50, 2000], giveUpAfterMs = 120_000, onResume = null,
    Embedder = loadEmbedder(),
  } = {}) {
    const c = new ResumableConversation();
    c.addresses = Array.isArray(addresses) ? addresses : [addresses];
    c.metadata = new grpc.Metadata();
    for (const [key, value] of metadata) c.metadata.add(key, value);
    Object.assign(c, { timeoutMs, backoffMs, giveUpAfterMs, onResume, Embedder });
    c.resumes = 0;
    c.turns = 0;
    c.nextAddress = 0;
    c.client = null;
    c.stream = null;
    c.lock = Promise.resolve();
    const create = { ...options, session_mode: 'SESSION_MODE_CREATE', session_id: sessionId };
    const ready = await c.openStream({ options: create }, false);
    c.sessionId = ready.session_id;
    c.dimensions = ready.dimensions;
    return c;
  }

  connect() {
    const address = this.addresses[this.nextAddress % this.addresses.length];
    this.nextAddress += 1;
    if (this.client) this.client.close();
    // A client (and so a channel) of its own: closing it closes its connection.
    this.client = new this.Embedder(address, grpc.credentials.createInsecure(),
      { 'grpc.use_local_subchannel_pool': 1 });
    this.stream = new Stream(this.client, this.metadata, Date.now() + this.timeoutMs);
    return address;
  }

  retryOrThrow(code, message, started, also = []) {
    if (!RESUMABLE.has(code) && !also.includes(code)) throw new SessionError(code, message);
    if (Date.now() - started > this.giveUpAfterMs) {
      throw new SessionError(code, `gave up after ${this.giveUpAfterMs} ms: ${message}`);
    }
  }

  // Opens a stream whose first request is `first` (options); retries with
  // backoff on the next address while the failure is retryable.
  async openStream(first, resume) {
    let delay = this.backoffMs[0];
    const started = Date.now();
    // On a resume the lost stream's lease may not have lapsed yet
    // (FAILED_PRECONDITION: held), as after a replica crashed.
    const also = resume ? [grpc.status.FAILED_PRECONDITION] : [];
    for (;;) {
      const address = this.connect();
      try {
        const response = await this.stream.ask(first);
        if (response.result === 'ready') {
          if (resume) {
            this.resumes += 1;
            if (this.onResume) this.onResume(address, response.ready);
          }
          return response.ready;
        }
        // In-band: UNAVAILABLE when the store is unreachable for a moment.
        this.retryOrThrow(response.error.code, response.error.message, started, also);
        this.stream.cancel();
      } catch (e) {
        if (e instanceof SessionError) throw e;
        this.retryOrThrow(e.code, e.details ?? e.message, started, also);
      }
      await sleep(delay * (0.5 + Math.random()));
      delay = Math.min(delay * 2, this.backoffMs[1]);
    }
  }

  resume() {
    return this.openStream({ options: { session_mode: 'SESSION_MODE_RESUME', session_id: this.sessionId } }, true);
  }

  // Runs `f` after every call before it (one turn at a time).
  serialize(f) {
    const result = this.lock.then(f);
    this.lock = result.catch(() => {});
    return result;
  }

  // The embedding of one more turn (values, turn_tokens, context_tokens…),
  // resuming the session on another stream as often as needed; each turn is
  // in the conversation exactly once.
  turn(text, role = 'user') {
    return this.serialize(async () => {
      const request = { tag: `turn-${this.turns}`, turn: { text, role } };
      const started = Date.now();
      for (;;) {
        let response;
        try {
          response = await this.stream.ask(request);
        } catch (e) {
          this.retryOrThrow(e.code, e.details ?? e.message, started);
          const ready = await this.resume();
          if (ready.turns === this.turns + 1) {
            // The turn made it in before the stream was lost: its answer is here.
            this.turns += 1;
            return ready.last_embedding;
          }
          this.checkTurns(ready);
          continue;
        }
        if (response.result === 'embedding') {
          this.turns += 1;
          return response.embedding;
        }
        const { code, message } = response.error;
        if (code !== grpc.status.UNAVAILABLE) throw new SessionError(code, message);
        // The store did not take the turn (the conversation is unchanged),
        // or this stream lost its hold on the session: leave the stream and
        // resume, then send the turn again.
        this.retryOrThrow(code, message, started);
        this.stream.cancel();
        this.checkTurns(await this.resume());
      }
    });
  }

  checkTurns(ready) {
    if (ready.turns !== this.turns) {
      throw new SessionError(grpc.status.DATA_LOSS, `the session has ${ready.turns} turns, this client ${this.turns}`);
    }
  }

  // Ends the session for good: a half-close read to its end. If the stream
  // was lost or handed off meanwhile, the session is resumed and that
  // stream half-closed instead.
  close() {
    return this.serialize(async () => {
      const started = Date.now();
      try {
        for (;;) {
          try {
            await this.stream.close();
            return;
          } catch (e) {
            this.retryOrThrow(e.code, e.details ?? e.message, started);
          }
          await this.resume();
        }
      } finally {
        this.client.close();
      }
    });
  }

  // Drops the stream without ending the session (it stays resumable).
  abandon() {
    this.stream.cancel();
    this.client.close();
  }
}

module.exports = { ResumableConversation, SessionError, loadEmbedder, RESUMABLE };
