//! The service's failures: every way a request or a stream can fail, its
//! gRPC code (one exhaustive mapping, matched down to the layers' own enums)
//! and the sentence the client reads; and tonic's over-size status, rewritten
//! to RESOURCE_EXHAUSTED in one place.

use tonic::{Code, Status, codegen::http};

use crate::{
    conversation::{OptionsError, TurnError},
    engine::EngineStopped,
    model::{ModelError, TokenizerError},
    pb,
};

/// Why a request or a stream failed: per-turn failures are answered in-band
/// on a stream (the session lives on), the rest end the call with a status.
/// Every variant maps to its gRPC code in [`ServiceError::code`], matched
/// variant by variant down to the layers' own enums: a new variant anywhere
/// forces a decision here.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    /// A ConverseRequest with no action.
    #[error("the request has no action: set one of options, turn or reset")]
    NoAction,
    /// Options after the first request.
    #[error("options are allowed only as the stream's first request")]
    OptionsNotFirst,
    /// An enum number this server does not know.
    #[error("unknown {field} value {value}")]
    UnknownEnum {
        /// The field.
        field: &'static str,
        /// The number sent.
        value: i32,
    },
    /// An Embed request with no texts.
    #[error("texts is empty")]
    NoTexts,
    /// Options that do not suit the model.
    #[error(transparent)]
    Options(#[from] OptionsError),
    /// The turn failed.
    #[error(transparent)]
    Turn(#[from] TurnError),
    /// One text of an Embed failed.
    #[error("texts[{index}] failed")]
    EmbedText {
        /// Which text.
        index: usize,
        /// Why.
        #[source]
        source: TurnError,
    },
    /// The model is still loading.
    #[error("the model is still loading; retry when health is SERVING")]
    Loading,
    /// SIGINT/SIGTERM: new streams and calls are refused while open streams drain.
    #[error("the server is shutting down and takes no new requests")]
    Draining,
    /// The server drains: a stream holding a session of the shared store is
    /// ended, for the client to resume the session on another replica.
    #[error("the server is draining: resume session {id:?} on another replica")]
    HandedOff {
        /// The session (also in the `se-resume-session` trailer).
        id: String,
    },
    /// The drain deadline passed with the stream still open.
    #[error("server shutting down")]
    ShuttingDown,
    /// `--max-streams` streams are open.
    #[error("too many open streams: the server's limit is {limit}")]
    TooManyStreams {
        /// The limit.
        limit: usize,
    },
    /// A message over `--max-message-bytes` (tonic's own message kept).
    #[error("{0}")]
    MessageTooLarge(String),
    /// The engine thread died: nothing can be embedded until a restart.
    #[error(transparent)]
    EngineStopped(#[from] EngineStopped),
    /// A session asked for a window over the server's cap.
    #[error("max_context_tokens {asked} is over the server's cap of {cap} tokens (--max-context-tokens)")]
    WindowOverCap {
        /// Asked for.
        asked: usize,
        /// The cap.
        cap: usize,
    },
    /// A message that is not valid protobuf for its type (bad bytes, a
    /// string field that is not UTF-8); tonic's own message kept.
    #[error("the message is not a valid request: {0}")]
    Undecodable(String),
    /// No accepted bearer token (`--auth-token-file`).
    #[error("missing or invalid bearer token: send `authorization: Bearer <token>` metadata")]
    Unauthenticated,
    /// A resumable session on a server with `--detached-ttl-seconds 0`.
    #[error("resumable sessions are off on this server (--detached-ttl-seconds 0)")]
    SessionsOff,
    /// A session id that is not 1-128 characters of A-Z a-z 0-9 . _ : -.
    #[error("session_id must be 1 to 128 characters of A-Z a-z 0-9 . _ : -")]
    BadSessionId,
    /// SESSION_MODE_CREATE with an id in use.
    #[error("session {id:?} already exists")]
    SessionExists {
        /// The id.
        id: String,
    },
    /// SESSION_MODE_RESUME of an unknown id.
    #[error("no session {id:?}: it never existed, ended with a half-close, or its detached TTL passed")]
    SessionNotFound {
        /// The id.
        id: String,
    },
    /// SESSION_MODE_RESUME of a session another open stream holds.
    #[error("session {id:?} is held by another open stream")]
    SessionHeld {
        /// The id.
        id: String,
    },
    /// SESSION_MODE_RESUME with other options set.
    #[error(
        "a resumed session keeps its own options: leave every SessionOptions field but session_id and session_mode unset"
    )]
    ResumeWithOptions,
    /// The shared session store is unreachable or failing (bounded by
    /// `--session-store-timeout-seconds`): retry.
    #[error(
        "the session store is unavailable ({reason}); the conversation is unchanged: retry, or resume the session later"
    )]
    StoreUnavailable {
        /// What the store call ran into (never a credential).
        reason: String,
    },
    /// This stream no longer holds its session: its lease in the store
    /// lapsed (the store was unreachable longer than the lease) and the
    /// session may be held elsewhere.
    #[error("this stream no longer holds session {id:?} (its lease lapsed): resume it")]
    SessionLost {
        /// The id.
        id: String,
    },
    /// What the store holds for a session is not a session this server can
    /// resume (a truncated token list, a foreign value, a newer format,
    /// another model's session).
    #[error("session {id:?} cannot be resumed: {reason}")]
    SessionCorrupt {
        /// The id.
        id: String,
        /// What is wrong with it.
        reason: String,
    },
    /// The server's own default options do not suit the model (a start-up check makes this unreachable).
    #[error("the server's default session options are invalid")]
    Defaults(#[source] OptionsError),
}

/// What a failure is to the outside: its gRPC code (the status that ends a
/// call, or the code of an in-band error) and its name in the
/// `se_rejected_total` metric's `reason`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Kind {
    code: Code,
    reason: &'static str,
}

const fn kind(code: Code, reason: &'static str) -> Kind {
    Kind { code, reason }
}

impl ServiceError {
    /// The one table: each failure's code and reason, stated once per
    /// variant, down to the layers' own enums (no catch-all: a new variant
    /// anywhere forces a decision here).
    fn kind(&self) -> Kind {
        use Code::*;
        match self {
            ServiceError::NoAction => kind(InvalidArgument, "no_action"),
            ServiceError::OptionsNotFirst => kind(InvalidArgument, "options_not_first"),
            ServiceError::UnknownEnum { .. } => kind(InvalidArgument, "unknown_enum"),
            ServiceError::NoTexts => kind(InvalidArgument, "no_texts"),
            ServiceError::WindowOverCap { .. } => kind(InvalidArgument, "window_over_cap"),
            ServiceError::BadSessionId => kind(InvalidArgument, "bad_session_id"),
            ServiceError::ResumeWithOptions => kind(InvalidArgument, "resume_with_options"),
            ServiceError::Undecodable(_) => kind(InvalidArgument, "undecodable"),
            ServiceError::SessionsOff => kind(FailedPrecondition, "sessions_off"),
            ServiceError::SessionHeld { .. } => kind(FailedPrecondition, "session_held"),
            ServiceError::SessionExists { .. } => kind(AlreadyExists, "session_exists"),
            ServiceError::SessionNotFound { .. } => kind(NotFound, "session_not_found"),
            ServiceError::Unauthenticated => kind(Unauthenticated, "unauthenticated"),
            ServiceError::StoreUnavailable { .. } => kind(Unavailable, "store_unavailable"),
            ServiceError::SessionLost { .. } => kind(Unavailable, "session_lost"),
            ServiceError::SessionCorrupt { .. } => kind(DataLoss, "session_corrupt"),
            ServiceError::Loading => kind(Unavailable, "loading"),
            ServiceError::Draining => kind(Unavailable, "draining"),
            ServiceError::ShuttingDown => kind(Unavailable, "shutting_down"),
            ServiceError::HandedOff { .. } => kind(Unavailable, "handed_off"),
            ServiceError::EngineStopped(EngineStopped) => kind(Unavailable, "engine_stopped"),
            ServiceError::TooManyStreams { .. } => kind(ResourceExhausted, "too_many_streams"),
            ServiceError::MessageTooLarge(_) => kind(ResourceExhausted, "message_too_large"),
            ServiceError::Defaults(_) => kind(Internal, "defaults"),
            ServiceError::Options(e) => options_kind(e),
            ServiceError::Turn(e) | ServiceError::EmbedText { source: e, .. } => turn_kind(e),
        }
    }

    /// The gRPC code (see the table in `kind`).
    pub fn code(&self) -> Code {
        self.kind().code
    }

    /// The name for the `se_rejected_total` metric's `reason` (see the
    /// table in `kind`).
    pub fn reason(&self) -> &'static str {
        self.kind().reason
    }

    /// One clear sentence for the client (internal failures hide their chain,
    /// which goes to the log).
    pub fn client_message(&self) -> String {
        match self {
            ServiceError::Turn(e) => turn_message(e),
            ServiceError::EmbedText { index, source } => format!("texts[{index}]: {}", turn_message(source)),
            _ if self.code() == Code::Internal => "the server failed to handle this request".to_string(),
            _ => self.to_string(),
        }
    }

    fn log(&self) {
        metrics::counter!("se_rejected_total", "reason" => self.reason(), "code" => format!("{:?}", self.code()))
            .increment(1);
        match self.code() {
            Code::Internal => tracing::error!(error = %ErrorChain(self), "request failed"),
            Code::Unavailable if matches!(self, ServiceError::EngineStopped(_)) => {
                tracing::error!(error = %self, "request failed");
            }
            _ => tracing::debug!(error = %self, "request refused"),
        }
    }

    /// The status that ends a call (logged).
    pub fn to_status(&self) -> Status {
        self.log();
        Status::new(self.code(), self.client_message())
    }

    /// The in-band error of a Converse response (logged).
    pub(super) fn to_pb(&self) -> pb::Error {
        self.log();
        pb::Error {
            code: self.code() as i32,
            message: self.client_message(),
        }
    }
}

impl From<ServiceError> for Status {
    fn from(e: ServiceError) -> Status {
        e.to_status()
    }
}

/// A turn's failure as the client reads it: internal ones hide their chain.
fn turn_message(e: &TurnError) -> String {
    if turn_kind(e).code == Code::Internal {
        "the model failed to run this turn; the conversation is unchanged".to_string()
    } else {
        e.to_string()
    }
}

/// The table's rows for options that do not suit the model.
fn options_kind(e: &OptionsError) -> Kind {
    match e {
        OptionsError::Dimensions { .. }
        | OptionsError::Window { .. }
        | OptionsError::Keep { .. }
        | OptionsError::Chunk
        | OptionsError::HeadNeedsProbeMean
        | OptionsError::NoHead(_)
        | OptionsError::NoEndToken
        | OptionsError::EndTokenIsRaw
        | OptionsError::MeanOverNeedsMean => kind(Code::InvalidArgument, "options"),
    }
}

/// The table's rows for a turn's failures.
fn turn_kind(e: &TurnError) -> Kind {
    use Code::*;
    match e {
        TurnError::UnknownRole(_) => kind(InvalidArgument, "unknown_role"),
        TurnError::Empty => kind(InvalidArgument, "empty_text"),
        TurnError::TurnTooLong { .. } => kind(ResourceExhausted, "turn_too_long"),
        TurnError::OverWindow { .. } => kind(ResourceExhausted, "over_window"),
        TurnError::ContextFull { .. } => kind(ResourceExhausted, "context_full"),
        TurnError::OverBudget { .. } => kind(ResourceExhausted, "over_budget"),
        TurnError::Busy => kind(FailedPrecondition, "busy"),
        TurnError::Options(o) => options_kind(o),
        TurnError::Tokenizer(
            TokenizerError::Encode(_) | TokenizerError::Load { .. } | TokenizerError::MissingMarker { .. },
        ) => kind(Internal, "tokenizer"),
        TurnError::Model(
            ModelError::Ort { .. }
            | ModelError::Runtime(_)
            | ModelError::Path { .. }
            | ModelError::Tokenizer(_)
            | ModelError::Config { .. }
            | ModelError::Contract { .. }
            | ModelError::Profile { .. },
        ) => kind(Internal, "model"),
    }
}

/// Displays an error with its sources.
pub struct ErrorChain<'a>(pub &'a dyn std::error::Error);

impl std::fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(s) = source {
            write!(f, ": {s}")?;
            source = s.source();
        }
        Ok(())
    }
}

/// What tonic says of a message over the size limit (in a status message,
/// and percent-encoded in a `grpc-message` header).
const OVERSIZE: [&str; 2] = ["message length too large", "message%20length%20too%20large"];

/// Whether tonic's status (code and message) is its "message too large":
/// OUT_OF_RANGE, where gRPC's convention (and every other implementation's)
/// is RESOURCE_EXHAUSTED.
fn is_oversize(code: Code, message: &str) -> bool {
    code == Code::OutOfRange && OVERSIZE.iter().any(|m| message.contains(m))
}

/// The status to end a stream with when reading from it failed: tonic's
/// own, except an over-size message, which is [`ServiceError::MessageTooLarge`].
pub(super) fn inbound_failure(status: Status) -> Status {
    if is_oversize(status.code(), status.message()) {
        ServiceError::MessageTooLarge(status.message().to_string()).to_status()
    } else if is_undecodable(status.code(), status.message()) {
        ServiceError::Undecodable(status.message().to_string()).to_status()
    } else {
        status
    }
}

/// What tonic says of a message prost cannot decode (INTERNAL, per gRPC's
/// status guide; for a request the client sent, INVALID_ARGUMENT says more).
fn is_undecodable(code: Code, message: &str) -> bool {
    code == Code::Internal && message.starts_with("failed to decode Protobuf message")
}

/// tonic answers an over-size unary request with OUT_OF_RANGE, and an
/// undecodable one with INTERNAL, before any handler runs; this response
/// layer rewrites those statuses (on trailers-only responses, where they sit
/// in the headers) to RESOURCE_EXHAUSTED and INVALID_ARGUMENT, as
/// `inbound_failure` does for streams.
pub fn rewrite_decode_statuses<B>(mut response: http::Response<B>) -> http::Response<B> {
    let headers = response.headers_mut();
    let message = headers
        .get("grpc-message")
        .and_then(|m| m.to_str().ok())
        .map(|m| m.replace("%20", " "));
    let status = headers
        .get("grpc-status")
        .and_then(|s| s.to_str().ok())
        .map(str::to_string);
    let rewrite = match (status.as_deref(), message.as_deref()) {
        (Some("11"), Some(m)) if is_oversize(Code::OutOfRange, m) => Some(Code::ResourceExhausted),
        (Some("13"), Some(m)) if is_undecodable(Code::Internal, m) => Some(Code::InvalidArgument),
        _ => None,
    };
    if let Some(code) = rewrite {
        headers.insert("grpc-status", http::HeaderValue::from(code as i32));
    }
    response
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Each failure maps to the code STYLE.md chooses for its kind.
    #[test]
    fn codes_are_chosen_per_variant() {
        let cases: Vec<(ServiceError, Code)> = vec![
            (ServiceError::NoAction, Code::InvalidArgument),
            (
                ServiceError::UnknownEnum {
                    field: "pooling",
                    value: 9,
                },
                Code::InvalidArgument,
            ),
            (ServiceError::Options(OptionsError::Chunk), Code::InvalidArgument),
            (ServiceError::Turn(TurnError::Empty), Code::InvalidArgument),
            (
                ServiceError::Turn(TurnError::ContextFull {
                    context: 1,
                    tokens: 2,
                    window: 2,
                }),
                Code::ResourceExhausted,
            ),
            (ServiceError::TooManyStreams { limit: 1 }, Code::ResourceExhausted),
            (ServiceError::MessageTooLarge("too big".into()), Code::ResourceExhausted),
            (ServiceError::Loading, Code::Unavailable),
            (ServiceError::Draining, Code::Unavailable),
            (ServiceError::ShuttingDown, Code::Unavailable),
            (ServiceError::EngineStopped(EngineStopped), Code::Unavailable),
            (
                ServiceError::Turn(TurnError::Model(ModelError::Contract {
                    path: "m.onnx".into(),
                    reason: "x".into(),
                })),
                Code::Internal,
            ),
            (ServiceError::Defaults(OptionsError::Chunk), Code::Internal),
            (ServiceError::WindowOverCap { asked: 9, cap: 8 }, Code::InvalidArgument),
            (ServiceError::BadSessionId, Code::InvalidArgument),
            (ServiceError::ResumeWithOptions, Code::InvalidArgument),
            (ServiceError::SessionsOff, Code::FailedPrecondition),
            (ServiceError::Unauthenticated, Code::Unauthenticated),
            (ServiceError::SessionHeld { id: "a".into() }, Code::FailedPrecondition),
            (ServiceError::SessionExists { id: "a".into() }, Code::AlreadyExists),
            (ServiceError::SessionNotFound { id: "a".into() }, Code::NotFound),
            (
                ServiceError::Turn(TurnError::OverBudget { need: 2, budget: 1 }),
                Code::ResourceExhausted,
            ),
            (ServiceError::Turn(TurnError::Busy), Code::FailedPrecondition),
        ];
        for (error, code) in cases {
            assert_eq!(error.code(), code, "{error:?}");
        }
    }

    /// Internal failures tell the client one sentence, not their chain; the rest say what was wrong.
    #[test]
    fn clients_read_one_clear_sentence() {
        let internal = ServiceError::EmbedText {
            index: 3,
            source: TurnError::Tokenizer(TokenizerError::Encode("bad".into())),
        };
        assert_eq!(
            internal.client_message(),
            "texts[3]: the model failed to run this turn; the conversation is unchanged"
        );
        assert_eq!(
            ServiceError::EmbedText {
                index: 0,
                source: TurnError::Empty
            }
            .client_message(),
            "texts[0]: the turn's text is empty"
        );
        let stopped = ServiceError::EngineStopped(EngineStopped).client_message();
        assert!(stopped.contains("engine has stopped"), "{stopped}");
        assert!(
            !stopped.contains("shutting down"),
            "a dead engine is not a shutdown: {stopped}"
        );
    }

    /// tonic's over-size status is recognised in a status and in a percent-encoded header, nothing else.
    #[test]
    fn oversize_is_recognised_in_both_spellings() {
        let tonic =
            Status::out_of_range("Error, decoded message length too large: found 5 bytes, the limit is: 4 bytes");
        assert_eq!(inbound_failure(tonic).code(), Code::ResourceExhausted);
        assert_eq!(inbound_failure(Status::out_of_range("other")).code(), Code::OutOfRange);
        assert_eq!(inbound_failure(Status::cancelled("gone")).code(), Code::Cancelled);
        let response = http::Response::builder()
            .header("grpc-status", "11")
            .header("grpc-message", "decoded%20message%20length%20too%20large")
            .body(())
            .unwrap();
        let rewritten = rewrite_decode_statuses(response);
        assert_eq!(rewritten.headers()["grpc-status"], "8");
    }
}
