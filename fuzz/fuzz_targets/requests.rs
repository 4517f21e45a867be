//! Request decoding and validation: any bytes, as a ConverseRequest or an
//! EmbedRequest, through the service's conversions. Must never panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use stateful_embedder::{
    pb::{self, converse_request::Action},
    service::{Limits, embed_options},
};

fuzz_target!(|data: &[u8]| {
    let limits = Limits {
        max_context_tokens: 8192,
        max_turn_tokens: 8192,
        prefill_chunk_tokens: 512,
        max_streams: 16,
        max_detached_sessions: 16,
        detached_ttl: None,
    };
    if let Ok(request) = pb::ConverseRequest::decode(data)
        && let Some(Action::Options(o)) = request.action
        && let Ok(options) = limits.session_options(&o)
    {
        assert!(options.max_context_tokens <= limits.max_context_tokens);
    }
    if let Ok(request) = pb::EmbedRequest::decode(data) {
        let _ = embed_options(&request, limits.default_options());
    }
});
