//! The decoder contract: what a model must look like, read off its ONNX
//! Runtime session (and config.json) at load. Layers, KV heads, head_dim and
//! element types come from the graph, never from assumptions; a graph that
//! breaks the contract fails the load with the reason.

use std::path::{Path, PathBuf};

use ort::{
    session::Session,
    value::{TensorElementType, ValueType},
};

use super::ModelError;

/// A float element type of the graph: the KV cache's, the hidden state's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FloatType {
    /// 32-bit float.
    F32,
    /// 16-bit float (the fp16 variant).
    F16,
}

impl FloatType {
    /// Bytes per element.
    pub fn size(self) -> usize {
        match self {
            FloatType::F32 => 4,
            FloatType::F16 => 2,
        }
    }

    /// The name clients see (`float32`/`float16`).
    pub fn name(self) -> &'static str {
        match self {
            FloatType::F32 => "float32",
            FloatType::F16 => "float16",
        }
    }

    pub(super) fn from_ort(t: TensorElementType) -> Option<Self> {
        match t {
            TensorElementType::Float32 => Some(FloatType::F32),
            TensorElementType::Float16 => Some(FloatType::F16),
            _ => None,
        }
    }
}

/// What the loaded model is, as discovered from its session and config.json.
#[derive(Debug, Clone)]
pub struct ModelSpec {
    /// A human-readable name (config.json `name`, else the directory name) and file.
    pub name: String,
    /// The ONNX file served.
    pub path: PathBuf,
    /// Decoder layers (`past_key_values.{i}.*` inputs).
    pub layers: usize,
    /// KV heads per layer.
    pub kv_heads: usize,
    /// Size of one head.
    pub head_dim: usize,
    /// Size of the hidden state (and of a full embedding).
    pub hidden_size: usize,
    /// Element type of the KV cache.
    pub kv_dtype: FloatType,
    /// Element type of `last_hidden_state`.
    pub hidden_dtype: FloatType,
    /// Whether the graph takes `position_ids`.
    pub has_position_ids: bool,
    /// Vocabulary size of the tokenizer.
    pub vocab_size: usize,
    /// The longest context the model supports (config.json
    /// `max_position_embeddings`; 8192 when absent).
    pub max_positions: usize,
}

impl ModelSpec {
    /// Bytes of KV cache one token of context costs.
    pub fn kv_bytes_per_token(&self) -> u64 {
        (self.layers * 2 * self.kv_heads * self.head_dim * self.kv_dtype.size()) as u64
    }
}

/// The parts of config.json the server reads.
#[derive(Debug, Default, serde::Deserialize)]
pub(super) struct ConfigJson {
    pub(super) name: Option<String>,
    pub(super) hidden_size: Option<usize>,
    pub(super) max_position_embeddings: Option<usize>,
}

/// config.json, or the defaults when there is none.
pub(super) fn read_config(path: &Path) -> Result<ConfigJson, ModelError> {
    match std::fs::read(path) {
        Ok(bytes) => serde_json::from_slice(&bytes).map_err(|source| ModelError::Config {
            path: path.to_path_buf(),
            source,
        }),
        Err(_) => Ok(ConfigJson::default()),
    }
}

/// Reads the I/O contract off the session; fails fast on any breach.
pub(super) fn discover(
    session: &Session,
    path: &Path,
    config: &ConfigJson,
    name: String,
    vocab_size: usize,
) -> Result<ModelSpec, ModelError> {
    let breach = |reason: String| ModelError::Contract {
        path: path.to_path_buf(),
        reason,
    };
    let input = |n: &str| session.inputs().iter().find(|o| o.name() == n).map(|o| o.dtype());
    let output = |n: &str| session.outputs().iter().find(|o| o.name() == n).map(|o| o.dtype());
    let tensor = |t: &ValueType| match t {
        ValueType::Tensor { ty, shape, .. } => Some((*ty, shape.iter().copied().collect::<Vec<i64>>())),
        _ => None,
    };

    for n in ["input_ids", "attention_mask"] {
        match input(n).and_then(tensor) {
            Some((TensorElementType::Int64, _)) => {}
            Some((ty, _)) => return Err(breach(format!("input {n} is {ty:?}, not int64"))),
            None => return Err(breach(format!("no input {n}"))),
        }
    }
    let has_position_ids = input("position_ids").is_some();

    let mut layers = 0;
    while input(&format!("past_key_values.{layers}.key")).is_some() {
        layers += 1;
    }
    if layers == 0 {
        return Err(breach(
            "no past_key_values.0.key input: not a decoder with a KV cache".into(),
        ));
    }
    let (kv_ty, kv_shape) = input("past_key_values.0.key")
        .and_then(tensor)
        .ok_or_else(|| breach("past_key_values.0.key is not a tensor".into()))?;
    let kv_dtype = FloatType::from_ort(kv_ty)
        .ok_or_else(|| breach(format!("KV cache type {kv_ty:?} is not float32 or float16")))?;
    if kv_shape.len() != 4 || kv_shape[1] <= 0 || kv_shape[3] <= 0 {
        return Err(breach(format!(
            "past_key_values.0.key has shape {kv_shape:?}; expected [batch, kv_heads, past, head_dim] with fixed kv_heads and head_dim"
        )));
    }
    for i in 0..layers {
        for kind in ["key", "value"] {
            let past = format!("past_key_values.{i}.{kind}");
            match input(&past).and_then(tensor) {
                Some((ty, shape))
                    if ty == kv_ty && shape.len() == 4 && shape[1] == kv_shape[1] && shape[3] == kv_shape[3] => {}
                Some((ty, shape)) => {
                    return Err(breach(format!(
                        "{past} is {ty:?} {shape:?}, unlike past_key_values.0.key"
                    )));
                }
                None => return Err(breach(format!("no input {past}"))),
            }
            if output(&format!("present.{i}.{kind}")).is_none() {
                return Err(breach(format!("no output present.{i}.{kind}")));
            }
        }
    }
    if input(&format!("past_key_values.{layers}.value")).is_some() {
        return Err(breach(format!("past_key_values.{layers}.value without a matching key")));
    }

    let Some((hidden_ty, hidden_shape)) = output("last_hidden_state").and_then(tensor) else {
        let hint = if output("logits").is_some() {
            ": it only has logits; run `python models/prepare.py import EXPORT_DIR --out DIR` to add it"
        } else {
            ""
        };
        return Err(breach(format!("no last_hidden_state output{hint}")));
    };
    let hidden_dtype = FloatType::from_ort(hidden_ty)
        .ok_or_else(|| breach(format!("last_hidden_state is {hidden_ty:?}, not float32 or float16")))?;
    let hidden_size = match hidden_shape.last() {
        Some(&d) if d > 0 => d as usize,
        _ => config
            .hidden_size
            .ok_or_else(|| breach("last_hidden_state's width is dynamic and config.json has no hidden_size".into()))?,
    };
    Ok(ModelSpec {
        name,
        path: path.to_path_buf(),
        layers,
        kv_heads: kv_shape[1] as usize,
        head_dim: kv_shape[3] as usize,
        hidden_size,
        kv_dtype,
        hidden_dtype,
        has_position_ids,
        vocab_size,
        max_positions: config.max_position_embeddings.unwrap_or(8192),
    })
}
