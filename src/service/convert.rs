//! Proto messages to the domain's types and back: enum numbers (unknown
//! ones are INVALID_ARGUMENT, never a panic), session and `Embed` options
//! over the server's defaults, a turn's output on the wire.

use super::{error::ServiceError, shared::Limits};
use crate::{
    conversation::{ConversationOptions, InputType, MeanOver, Overflow, Pooling, Standardize, TurnOutput},
    model::Model,
    pb,
};

/// The pooling asked for; unset, `default` (the model's).
fn pooling(value: i32, default: Pooling) -> Result<Pooling, ServiceError> {
    match pb::Pooling::try_from(value) {
        Ok(pb::Pooling::Unspecified) => Ok(default),
        Ok(pb::Pooling::Mean) => Ok(Pooling::Mean),
        Ok(pb::Pooling::LastToken) => Ok(Pooling::LastToken),
        Ok(pb::Pooling::Probe) => Ok(Pooling::Probe),
        Ok(pb::Pooling::ProbeMean) => Ok(Pooling::ProbeMean),
        Ok(pb::Pooling::EndToken) => Ok(Pooling::EndToken),
        Err(_) => Err(ServiceError::UnknownEnum {
            field: "pooling",
            value,
        }),
    }
}

/// A pooling on the wire.
pub fn pooling_on_wire(p: Pooling) -> pb::Pooling {
    match p {
        Pooling::Mean => pb::Pooling::Mean,
        Pooling::LastToken => pb::Pooling::LastToken,
        Pooling::Probe => pb::Pooling::Probe,
        Pooling::ProbeMean => pb::Pooling::ProbeMean,
        Pooling::EndToken => pb::Pooling::EndToken,
    }
}

/// The standardisation asked for; unset, the pooling's default on `model`.
fn standardize(value: i32, pooling: Pooling, model: &Model) -> Result<Standardize, ServiceError> {
    match pb::Standardize::try_from(value) {
        Ok(pb::Standardize::Unspecified) => Ok(Standardize::default_for(pooling, model)),
        Ok(pb::Standardize::Zscore) => Ok(Standardize::Zscore),
        Ok(pb::Standardize::None) => Ok(Standardize::None),
        Ok(pb::Standardize::Head) => Ok(Standardize::Head),
        Ok(pb::Standardize::Whiten) => Ok(Standardize::Whiten),
        Err(_) => Err(ServiceError::UnknownEnum {
            field: "standardize",
            value,
        }),
    }
}

fn input_type(value: i32) -> Result<InputType, ServiceError> {
    match pb::InputType::try_from(value) {
        Ok(pb::InputType::Unspecified) => Ok(InputType::Raw),
        Ok(pb::InputType::Query) => Ok(InputType::Query),
        Ok(pb::InputType::Document) => Ok(InputType::Document),
        Err(_) => Err(ServiceError::UnknownEnum {
            field: "input_type",
            value,
        }),
    }
}

/// The mean asked for; unset, `pooling`'s default (the conversation's for
/// the poolings that take a mean).
fn mean_over(value: i32, pooling: Pooling) -> Result<MeanOver, ServiceError> {
    match pb::MeanOver::try_from(value) {
        Ok(pb::MeanOver::Unspecified) => Ok(MeanOver::default_for(pooling)),
        Ok(pb::MeanOver::Turn) => Ok(MeanOver::Turn),
        Ok(pb::MeanOver::Conversation) => Ok(MeanOver::Conversation),
        Err(_) => Err(ServiceError::UnknownEnum {
            field: "mean_over",
            value,
        }),
    }
}

fn overflow(value: i32) -> Result<Overflow, ServiceError> {
    match pb::Overflow::try_from(value) {
        Ok(pb::Overflow::Unspecified | pb::Overflow::Slide) => Ok(Overflow::Slide),
        Ok(pb::Overflow::Reject) => Ok(Overflow::Reject),
        Ok(pb::Overflow::Reset) => Ok(Overflow::Reset),
        Err(_) => Err(ServiceError::UnknownEnum {
            field: "overflow",
            value,
        }),
    }
}

/// An `Embed` request's options over the server's defaults on `model` (a
/// stream's: the same pooling and standardisation; each text is a one-turn
/// conversation whose mean is its text's, its template left out).
pub fn embed_options(
    req: &pb::EmbedRequest,
    limits: &Limits,
    model: &Model,
) -> Result<ConversationOptions, ServiceError> {
    let base = limits.default_options(model);
    let pooling = pooling(req.pooling, base.pooling)?;
    Ok(ConversationOptions {
        pooling,
        dimensions: dimensions(req.dimensions),
        normalize: req.normalize.unwrap_or(base.normalize),
        standardize: standardize(req.standardize, pooling, model)?,
        input_type: input_type(req.input_type)?,
        mean_over: MeanOver::Turn,
        ..base
    })
}

fn dimensions(value: u32) -> Option<usize> {
    (value != 0).then_some(value as usize)
}

impl Limits {
    /// Session options from the wire, over the server's defaults on `model`.
    pub fn session_options(&self, o: &pb::SessionOptions, model: &Model) -> Result<ConversationOptions, ServiceError> {
        let base = self.default_options(model);
        if o.max_context_tokens as usize > self.max_context_tokens {
            return Err(ServiceError::WindowOverCap {
                asked: o.max_context_tokens as usize,
                cap: self.max_context_tokens,
            });
        }
        let pooling = pooling(o.pooling, base.pooling)?;
        Ok(ConversationOptions {
            pooling,
            dimensions: dimensions(o.dimensions),
            normalize: o.normalize.unwrap_or(base.normalize),
            max_context_tokens: if o.max_context_tokens == 0 {
                base.max_context_tokens
            } else {
                o.max_context_tokens as usize
            },
            overflow: overflow(o.overflow)?,
            keep_tokens: o.keep_tokens as usize,
            include_turn_mean: o.include_turn_mean,
            standardize: standardize(o.standardize, pooling, model)?,
            input_type: input_type(o.input_type)?,
            mean_over: mean_over(o.mean_over, pooling)?,
            ..base
        })
    }
}

/// A count for one of the proto's u32 fields (they cannot overflow in
/// practice, but a count never wraps).
pub fn saturating_u32(n: usize) -> u32 {
    u32::try_from(n).unwrap_or(u32::MAX)
}

/// A turn's output read back from the wire (a stored last answer; what it
/// rebuilt is not kept).
pub(super) fn output(e: pb::Embedding) -> TurnOutput {
    TurnOutput {
        embedding: e.values,
        turn_mean: (!e.turn_mean.is_empty()).then_some(e.turn_mean),
        turn_tokens: e.turn_tokens as usize,
        context_tokens: e.context_tokens as usize,
        dropped_tokens: e.dropped_tokens as usize,
        rebuilt_tokens: 0,
    }
}

/// A turn's output on the wire.
pub(super) fn embedding(out: TurnOutput) -> pb::Embedding {
    pb::Embedding {
        values: out.embedding,
        turn_tokens: saturating_u32(out.turn_tokens),
        context_tokens: saturating_u32(out.context_tokens),
        dropped_tokens: saturating_u32(out.dropped_tokens),
        turn_mean: out.turn_mean.unwrap_or_default(),
    }
}
