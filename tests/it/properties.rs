//! Property tests (proptest, stable Rust, a bounded number of cases each):
//! request validation and conversion over arbitrary wire values, and
//! tokenizer + turn assembly + a whole turn over arbitrary text. Each holds
//! for every case: no panic, every refusal a clear error of the right kind,
//! every acceptance within the limits, a failed turn changing nothing.

use proptest::prelude::*;
use stateful_embedder::{
    conversation::{Conversation, ConversationOptions},
    pb,
    service::{Limits, embed_options},
};
use tonic::Code;

use crate::common;

fn limits() -> Limits {
    Limits {
        max_context_tokens: 512,
        max_turn_tokens: 256,
        prefill_chunk_tokens: 64,
        max_sessions: 8,
        detached_ttl: None,
    }
}

/// Wire enum values: the known ones, and numbers no version defines.
fn enum_value() -> impl Strategy<Value = i32> {
    prop_oneof![0..5i32, any::<i32>()]
}

fn session_options() -> impl Strategy<Value = pb::SessionOptions> {
    (
        (
            enum_value(),
            prop_oneof![0..100u32, any::<u32>()],
            any::<Option<bool>>(),
        ),
        (
            prop_oneof![0..1024u32, any::<u32>()],
            enum_value(),
            prop_oneof![0..600u32, any::<u32>()],
        ),
        (any::<bool>(), enum_value(), enum_value(), enum_value()),
    )
        .prop_map(
            |((pooling, dimensions, normalize), (window, overflow, keep), (mean, standardize, input_type, mode))| {
                pb::SessionOptions {
                    pooling,
                    dimensions,
                    normalize,
                    max_context_tokens: window,
                    overflow,
                    keep_tokens: keep,
                    include_turn_mean: mean,
                    standardize,
                    input_type,
                    session_id: String::new(),
                    session_mode: mode,
                }
            },
        )
}

/// Text from every corner of Unicode, ChatML-looking markers included.
fn text() -> impl Strategy<Value = String> {
    prop_oneof![
        "\\PC{0,60}",
        ".{0,40}",
        Just(String::new()),
        Just("<|im_start|>user\nhi<|im_end|>".to_string()),
        "[ \t\n]{0,8}",
        "(def |fn |<\\|endoftext\\|>|🦀|日本語|\u{0}){1,6}",
    ]
}

fn role() -> impl Strategy<Value = String> {
    prop_oneof![
        Just(String::new()),
        Just("system".to_string()),
        Just("user".to_string()),
        Just("assistant".to_string()),
        "[a-z]{1,8}",
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Session options: an acceptance is within the caps and makes a
    /// conversation or a clear options error; a refusal is INVALID_ARGUMENT.
    #[test]
    fn session_options_are_accepted_within_limits_or_refused_clearly(o in session_options()) {
        let model = common::tiny();
        let limits = limits();
        match limits.session_options(&o) {
            Ok(options) => {
                prop_assert!(options.max_context_tokens <= limits.max_context_tokens);
                prop_assert_eq!(options.max_turn_tokens, limits.max_turn_tokens);
                match Conversation::new(&model, options.clone()) {
                    Ok(c) => {
                        let dims = c.options().output_dimensions(&model);
                        prop_assert!(dims >= 1 && dims <= model.spec().hidden_size);
                        prop_assert!(options.keep_tokens <= options.max_context_tokens / 2);
                    }
                    Err(e) => prop_assert!(!e.to_string().is_empty()),
                }
            }
            Err(e) => {
                prop_assert_eq!(e.code(), Code::InvalidArgument, "{}", e);
                prop_assert!(!e.client_message().is_empty());
            }
        }
    }

    /// Embed's options likewise, over Embed's defaults.
    #[test]
    fn embed_options_are_accepted_or_refused_clearly(
        pooling in enum_value(), standardize in enum_value(), input_type in enum_value(),
        dimensions in prop_oneof![0..100u32, any::<u32>()],
    ) {
        let model = common::tiny();
        let req = pb::EmbedRequest { texts: vec!["x".into()], pooling, standardize, input_type, dimensions, normalize: None };
        match embed_options(&req, limits().default_options()) {
            Ok(o) => {
                if let Err(e) = o.validate(&model) {
                    prop_assert!(!e.to_string().is_empty());
                }
            }
            Err(e) => prop_assert_eq!(e.code(), Code::InvalidArgument, "{}", e),
        }
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(96))]

    /// Tokenizer and turn assembly: the text span lies inside the ids; with
    /// a role, the ChatML markers wrap it; a whole turn either succeeds
    /// (the context grows by exactly its tokens, the vector is finite and
    /// normalised) or fails leaving the conversation exactly as it was.
    #[test]
    fn turns_of_any_text_are_assembled_and_all_or_nothing(
        first in text(), second in text(), role in role(), prefix in "\\PC{0,6}", suffix in "\\PC{0,6}",
    ) {
        let model = common::tiny();
        let tok = model.tokenizer();
        for (text, role) in [(first.as_str(), ""), (second.as_str(), role.as_str())] {
            if let Ok(t) = tok.turn_templated(text, role, &prefix, &suffix) {
                prop_assert!(t.text.start <= t.text.end && t.text.end <= t.ids.len());
                if role.is_empty() && prefix.is_empty() && suffix.is_empty() {
                    prop_assert_eq!(t.text.clone(), 0..t.ids.len());
                }
            }
        }
        let options = ConversationOptions { max_turn_tokens: 200, max_context_tokens: 256, prefill_chunk_tokens: 16, ..Default::default() };
        let mut conv = Conversation::new(&model, options).unwrap();
        for (text, role) in [(first.as_str(), ""), (second.as_str(), role.as_str())] {
            let (tokens, bytes) = (conv.tokens().to_vec(), conv.kv_bytes());
            match conv.turn(text, role) {
                Ok(out) => {
                    prop_assert_eq!(conv.context_len(), out.context_tokens);
                    prop_assert!(out.turn_tokens > 0);
                    prop_assert!(out.embedding.iter().all(|x| x.is_finite()));
                    let norm: f32 = out.embedding.iter().map(|x| x * x).sum::<f32>().sqrt();
                    prop_assert!((norm - 1.0).abs() < 1e-3, "norm {}", norm);
                }
                Err(_) => {
                    prop_assert_eq!(conv.tokens(), &tokens[..]);
                    prop_assert_eq!(conv.kv_bytes(), bytes);
                }
            }
        }
    }
}
