//! Property tests (proptest, stable Rust, a bounded number of cases each):
//! request validation and conversion over arbitrary wire values, and
//! tokenizer + turn assembly + a whole turn over arbitrary text. Each holds
//! for every case: no panic, every refusal a clear error of the right kind,
//! every acceptance exactly what was asked (checked against the documented
//! rules written out here) and a working conversation, a failed turn
//! changing nothing.
//!
//! Failures are persisted in `tests/proptest-regressions/properties.txt`
//! (committed): a case that once failed is tried first in every run.

use proptest::{prelude::*, test_runner::FileFailurePersistence};
use stateful_embedder::{
    conversation::{Conversation, ConversationOptions, InputType, MeanOver, Overflow, Pooling, Standardize},
    pb,
    service::{Limits, embed_options},
};
use tonic::Code;

use crate::support::{models as common, profile};

/// The cases of each property, with the failure file pinned.
fn config(cases: u32) -> ProptestConfig {
    ProptestConfig {
        cases,
        failure_persistence: Some(Box::new(FileFailurePersistence::SourceParallel("proptest-regressions"))),
        ..ProptestConfig::default()
    }
}

/// The pooling a wire value asks for, by the proto's documentation.
fn wire_pooling(v: i32) -> Option<Pooling> {
    Some(match v {
        0 | 4 => Pooling::ProbeMean,
        1 => Pooling::LastToken,
        2 => Pooling::Mean,
        3 => Pooling::Probe,
        5 => Pooling::EndToken,
        _ => return None,
    })
}

/// The standardisation a wire value asks for; unset, the pooling's default
/// (the tiny model's card: PROBE_MEAN, a head, an end token).
fn wire_standardize(v: i32, pooling: Pooling) -> Option<Standardize> {
    Some(match v {
        0 => match pooling {
            Pooling::ProbeMean => Standardize::Head,
            Pooling::Probe => Standardize::Whiten,
            Pooling::Mean | Pooling::LastToken => Standardize::Zscore,
            Pooling::EndToken => Standardize::None,
        },
        1 => Standardize::None,
        2 => Standardize::Zscore,
        3 => Standardize::Head,
        4 => Standardize::Whiten,
        _ => return None,
    })
}

fn wire_input_type(v: i32) -> Option<InputType> {
    Some(match v {
        0 => InputType::Raw,
        1 => InputType::Query,
        2 => InputType::Document,
        _ => return None,
    })
}

fn wire_overflow(v: i32) -> Option<Overflow> {
    Some(match v {
        0 | 1 => Overflow::Slide,
        2 => Overflow::Reject,
        3 => Overflow::Reset,
        _ => return None,
    })
}

/// The documented rule: unset is the conversation for the poolings that
/// take a mean (MEAN, PROBE_MEAN), the turn for the others.
fn wire_mean_over(v: i32, pooling: Pooling) -> Option<MeanOver> {
    Some(match v {
        0 if matches!(pooling, Pooling::Mean | Pooling::ProbeMean) => MeanOver::Conversation,
        0 | 1 => MeanOver::Turn,
        2 => MeanOver::Conversation,
        _ => return None,
    })
}

/// The vector length options give on the tiny model, from the documented
/// rules (hidden 64; the head's width read from its file): `None` when the
/// options cannot work.
fn expected_dimensions(o: &ConversationOptions) -> Option<usize> {
    let hidden = 64;
    let head = profile::of(&common::tiny_dir())
        .head
        .as_ref()
        .expect("the tiny model has a head")
        .matrix
        .cols;
    if o.standardize == Standardize::Head && o.pooling != Pooling::ProbeMean {
        return None;
    }
    if o.pooling == Pooling::EndToken && o.standardize != Standardize::None {
        return None;
    }
    if o.mean_over == MeanOver::Conversation && !matches!(o.pooling, Pooling::Mean | Pooling::ProbeMean) {
        return None;
    }
    let max = match (o.pooling, o.standardize) {
        (_, Standardize::Head) => head,
        (Pooling::ProbeMean, _) => 2 * hidden,
        _ => hidden,
    };
    let default = match (o.pooling, o.standardize) {
        (Pooling::ProbeMean, Standardize::Whiten) => 2 * 384,
        (_, Standardize::Whiten) => 384,
        _ => max,
    };
    match o.dimensions {
        Some(d) if d == 0 || d > max => None,
        Some(d) => Some(d),
        None => Some(default.min(max)),
    }
}

/// Whether options other than the dimensions can work (the documented rules).
fn window_and_keep_fit(o: &ConversationOptions) -> bool {
    (2..=common::tiny().spec().max_positions).contains(&o.max_context_tokens)
        && o.keep_tokens <= o.max_context_tokens / 2
}

fn limits() -> Limits {
    Limits {
        max_context_tokens: 512,
        max_turn_tokens: 256,
        prefill_chunk_tokens: 64,
        max_streams: 8,
        max_detached_sessions: 8,
        detached_ttl: None,
    }
}

/// Wire enum values: the known ones, and numbers no version defines.
fn enum_value() -> impl Strategy<Value = i32> {
    prop_oneof![0..6i32, any::<i32>()]
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
        (any::<bool>(), enum_value(), enum_value(), enum_value(), enum_value()),
    )
        .prop_map(
            |(
                (pooling, dimensions, normalize),
                (window, overflow, keep),
                (mean, standardize, input_type, mode, mean_over),
            )| {
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
                    mean_over,
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

/// A turn on an accepted conversation gives a vector of exactly the
/// expected length, finite, of unit norm when normalised.
fn check_turn(conv: &mut Conversation, dims: usize, normalize: bool) -> Result<(), TestCaseError> {
    let out = conv
        .turn("def add(a, b): return a + b", "user")
        .map_err(|e| TestCaseError::fail(format!("a turn on accepted options failed: {e}")))?;
    prop_assert_eq!(out.embedding.len(), dims);
    prop_assert!(out.embedding.iter().all(|x| x.is_finite()));
    if normalize {
        let norm: f64 = out.embedding.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
        prop_assert!((norm - 1.0).abs() < 1e-3, "norm {}", norm);
    }
    Ok(())
}

proptest! {
    #![proptest_config(config(256))]

    /// Session options: a refusal is INVALID_ARGUMENT with a message; an
    /// acceptance is exactly what was asked over the server's defaults, and
    /// a conversation on it exists exactly when the documented rules say
    /// the options can work, with vectors of exactly the documented length.
    #[test]
    fn session_options_are_accepted_as_asked_or_refused_clearly(o in session_options()) {
        let model = common::tiny();
        let limits = limits();
        match limits.session_options(&o, &model) {
            Ok(options) => {
                let pooling = wire_pooling(o.pooling).expect("an unknown pooling was refused");
                prop_assert_eq!(options.pooling, pooling);
                prop_assert_eq!(Some(options.standardize), wire_standardize(o.standardize, pooling));
                prop_assert_eq!(Some(options.input_type), wire_input_type(o.input_type));
                prop_assert_eq!(Some(options.overflow), wire_overflow(o.overflow));
                prop_assert_eq!(Some(options.mean_over), wire_mean_over(o.mean_over, pooling));
                prop_assert_eq!(options.dimensions, (o.dimensions != 0).then_some(o.dimensions as usize));
                prop_assert_eq!(options.normalize, o.normalize.unwrap_or(true));
                let window = if o.max_context_tokens == 0 { limits.max_context_tokens } else { o.max_context_tokens as usize };
                prop_assert_eq!(options.max_context_tokens, window);
                prop_assert!(window <= limits.max_context_tokens, "a window over the cap was accepted");
                prop_assert_eq!(options.keep_tokens, o.keep_tokens as usize);
                prop_assert_eq!(options.include_turn_mean, o.include_turn_mean);
                prop_assert_eq!(options.max_turn_tokens, limits.max_turn_tokens);
                prop_assert_eq!(options.prefill_chunk_tokens, limits.prefill_chunk_tokens);
                let want = expected_dimensions(&options).filter(|_| window_and_keep_fit(&options));
                match (Conversation::new(&model, options.clone()), want) {
                    (Ok(mut c), Some(dims)) => {
                        prop_assert_eq!(c.options().output_dimensions(&model), dims);
                        check_turn(&mut c, dims, options.normalize)?;
                    }
                    (Err(e), None) => prop_assert!(!e.to_string().is_empty()),
                    (Ok(_), None) => prop_assert!(false, "options that cannot work were accepted: {:?}", options),
                    (Err(e), Some(_)) => prop_assert!(false, "options that can work were refused ({}): {:?}", e, options),
                }
            }
            Err(e) => {
                prop_assert_eq!(e.code(), Code::InvalidArgument, "{}", e);
                prop_assert!(!e.client_message().is_empty());
                let known = wire_pooling(o.pooling).is_some_and(|p| {
                    wire_standardize(o.standardize, p).is_some()
                        && wire_input_type(o.input_type).is_some()
                        && wire_overflow(o.overflow).is_some()
                        && wire_mean_over(o.mean_over, p).is_some()
                });
                prop_assert!(
                    !known || o.max_context_tokens as usize > limits.max_context_tokens,
                    "options of known values within the cap were refused: {}", e
                );
            }
        }
    }

    /// Embed's options likewise, over the server's defaults.
    #[test]
    fn embed_options_are_accepted_as_asked_or_refused_clearly(
        pooling in enum_value(), standardize in enum_value(), input_type in enum_value(),
        dimensions in prop_oneof![0..100u32, any::<u32>()], normalize in any::<Option<bool>>(),
    ) {
        let model = common::tiny();
        let req = pb::EmbedRequest { texts: vec!["x".into()], pooling, standardize, input_type, dimensions, normalize };
        let known = wire_pooling(pooling)
            .is_some_and(|p| wire_standardize(standardize, p).is_some() && wire_input_type(input_type).is_some());
        match embed_options(&req, &limits(), &model) {
            Ok(o) => {
                prop_assert!(known);
                let p = wire_pooling(pooling).unwrap();
                prop_assert_eq!(o.pooling, p);
                prop_assert_eq!(Some(o.standardize), wire_standardize(standardize, p));
                prop_assert_eq!(Some(o.input_type), wire_input_type(input_type));
                prop_assert_eq!(o.dimensions, (dimensions != 0).then_some(dimensions as usize));
                prop_assert_eq!(o.normalize, normalize.unwrap_or(true));
                match (o.validate(&model), expected_dimensions(&o)) {
                    (Ok(()), Some(dims)) => {
                        let mut c = Conversation::new(&model, o.clone()).unwrap();
                        check_turn(&mut c, dims, o.normalize)?;
                    }
                    (Err(e), None) => prop_assert!(!e.to_string().is_empty()),
                    (Ok(()), None) => prop_assert!(false, "options that cannot work were accepted: {:?}", o),
                    (Err(e), Some(_)) => prop_assert!(false, "options that can work were refused ({}): {:?}", e, o),
                }
            }
            Err(e) => {
                prop_assert_eq!(e.code(), Code::InvalidArgument, "{}", e);
                prop_assert!(!known, "known values were refused: {}", e);
            }
        }
    }
}

proptest! {
    #![proptest_config(config(96))]

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
