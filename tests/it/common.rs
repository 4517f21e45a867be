//! Shared helpers: model locations, shared loaded models, the oracle, vector comparison.
//!
//! A missing model is a failure ("run `make models`"), never a skip.

use std::{
    ops::Range,
    path::PathBuf,
    sync::{Arc, OnceLock},
};

use stateful_embedder::{
    conversation::{ConversationOptions, DEFAULT_WHITEN_COMPONENTS, Pooling, Standardize},
    model::{Model, ModelOptions},
};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn tiny_dir() -> PathBuf {
    root().join("models/tiny")
}

pub fn real_dir() -> PathBuf {
    root().join("models/qwen2.5-coder-0.5b-instruct")
}

/// The prepared model file; panics (the test fails) when it is missing.
pub fn model_file(dir: PathBuf, file: &str) -> PathBuf {
    let path = dir.join(file);
    assert!(
        path.exists(),
        "{} is not prepared (run `make models`); tests never skip a missing model",
        path.display()
    );
    path
}

fn load(cell: &'static OnceLock<Arc<Model>>, dir: PathBuf, file: &str) -> Arc<Model> {
    cell.get_or_init(|| Model::open(model_file(dir, file), &ModelOptions::default()).expect("the prepared model loads"))
        .clone()
}

pub fn tiny() -> Arc<Model> {
    static CELL: OnceLock<Arc<Model>> = OnceLock::new();
    load(&CELL, tiny_dir(), "model.onnx")
}

pub fn tiny_fp16() -> Arc<Model> {
    static CELL: OnceLock<Arc<Model>> = OnceLock::new();
    load(&CELL, tiny_dir(), "model_fp16.onnx")
}

/// The real f32 model, shared.
pub fn real() -> Arc<Model> {
    static CELL: OnceLock<Arc<Model>> = OnceLock::new();
    load(&CELL, real_dir(), "model.onnx")
}

/// The oracle: one call with an empty cache over `ids`, pooled over `span`
/// (for the probe pooling: one call over `ids` followed by the probe's
/// tokens, the last row), standardised with the model's statistics if the
/// options say so, truncated and normalised.
pub fn oracle(model: &Model, ids: &[u32], span: Range<usize>, options: &ConversationOptions) -> Vec<f32> {
    let mut pooled = if options.pooling == Pooling::Probe {
        let mut all = ids.to_vec();
        all.extend_from_slice(model.probe_ids());
        let n = all.len();
        let (hidden, _) = model
            .forward(&all, &model.empty_cache(), n - 1..n)
            .expect("the oracle's forward pass runs");
        hidden.row(0).to_vec()
    } else {
        pool(model, ids, span, options.pooling)
    };
    let hidden = pooled.len();
    let dims = options
        .dimensions
        .unwrap_or(if options.standardize == Standardize::Whiten {
            DEFAULT_WHITEN_COMPONENTS
        } else {
            hidden
        })
        .min(hidden);
    if options.standardize == Standardize::Whiten {
        // y_j = sum_i (x_i - mean_i) W[i, j], W row-major [h, h], j < dims.
        let stats = model.embedding_stats().get(stats_key(options.pooling));
        let centred: Vec<f64> = pooled.iter().zip(&stats.mean).map(|(x, m)| f64::from(x - m)).collect();
        pooled = (0..dims)
            .map(|j| {
                (0..hidden)
                    .map(|i| centred[i] * f64::from(stats.whiten[i * hidden + j]))
                    .sum::<f64>() as f32
            })
            .collect();
    } else if options.standardize != Standardize::None {
        let stats = model.embedding_stats().get(stats_key(options.pooling));
        for (i, x) in pooled.iter_mut().enumerate() {
            *x = (*x - stats.mean[i]) * stats.inv_std[i];
        }
    }
    if options.standardize == Standardize::Head {
        // y = z · W, W row-major [h, h].
        let w = model.embedding_stats().head();
        let h = pooled.len();
        pooled = (0..h)
            .map(|j| {
                (0..h)
                    .map(|i| f64::from(pooled[i]) * f64::from(w[i * h + j]))
                    .sum::<f64>() as f32
            })
            .collect();
    }
    truncate_and_normalize(pooled, dims, options.normalize)
}

fn stats_key(pooling: Pooling) -> &'static str {
    match pooling {
        Pooling::Mean => "mean",
        Pooling::LastToken => "last_token",
        Pooling::Probe => "probe",
    }
}

/// Mean or last-token pooling of one empty-cache call over `ids`.
fn pool(model: &Model, ids: &[u32], span: Range<usize>, pooling: Pooling) -> Vec<f32> {
    let (hidden, _) = model
        .forward(ids, &model.empty_cache(), span.clone())
        .expect("the oracle's forward pass runs");
    assert_eq!(hidden.rows(), span.len());
    let width = hidden.width;
    match pooling {
        Pooling::Mean => {
            let mut sum = vec![0f64; width];
            for r in 0..hidden.rows() {
                for (s, v) in sum.iter_mut().zip(hidden.row(r)) {
                    *s += f64::from(*v);
                }
            }
            sum.iter().map(|s| (s / hidden.rows() as f64) as f32).collect()
        }
        Pooling::LastToken | Pooling::Probe => hidden.row(hidden.rows() - 1).to_vec(),
    }
}

/// The documented post-processing, written here rather than borrowed from the
/// code under test: keep the first `dims` components, then scale to unit L2
/// norm (in f64) if asked.
fn truncate_and_normalize(mut v: Vec<f32>, dims: usize, normalize: bool) -> Vec<f32> {
    v.truncate(dims);
    if normalize {
        let norm: f64 = v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
        if norm > 0.0 {
            v.iter_mut().for_each(|x| *x = (f64::from(*x) / norm) as f32);
        }
    }
    v
}

pub fn cosine(a: &[f32], b: &[f32]) -> f64 {
    assert_eq!(a.len(), b.len(), "vectors of different lengths");
    let dot: f64 = a.iter().zip(b).map(|(x, y)| f64::from(*x) * f64::from(*y)).sum();
    let na: f64 = a.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    let nb: f64 = b.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    dot / (na * nb)
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "vectors of different lengths");
    a.iter().zip(b).map(|(x, y)| (x - y).abs()).fold(0.0, f32::max)
}

/// Tolerances an oracle comparison holds.
#[derive(Debug, Clone, Copy)]
pub struct Tolerance {
    pub min_cosine: f64,
    pub max_abs: f32,
}

/// f32. Rests on: chunked and one-shot prefill of one conversation run the
/// same arithmetic on every x86-64 CPU (prepacked weights take one MLAS
/// kernel whatever the row count; see tests/python/test_model.py), measured
/// 0.0 on AVX-512 and on emulated AVX2 (`make test-avx2`). Batched turns
/// (left-padded rows) differ by rounding: measured ≤ 4e-5 on the real model's
/// hidden states before pooling, far less after. The bounds are margins above both.
pub const F32: Tolerance = Tolerance {
    min_cosine: 0.99999,
    max_abs: 1e-4,
};

/// fp16 KV and hidden output: both sides read the same fp16-rounded K/V, but a
/// value near a rounding boundary can land one fp16 ulp apart (2^-10 ≈ 9.8e-4
/// relative), which pooling and normalisation shrink but do not remove.
pub const FP16: Tolerance = Tolerance {
    min_cosine: 0.9999,
    max_abs: 2e-3,
};

#[track_caller]
pub fn assert_close(what: &str, got: &[f32], want: &[f32], tol: Tolerance) -> (f64, f32) {
    let c = cosine(got, want);
    let d = max_abs_diff(got, want);
    assert!(
        c >= tol.min_cosine && d <= tol.max_abs,
        "{what}: cosine {c:.8} (min {}), max abs diff {d:.3e} (max {:.1e})",
        tol.min_cosine,
        tol.max_abs
    );
    (c, d)
}

/// A model instance of its own, for tests that count its calls (the shared
/// ones are used by tests running in parallel).
pub fn tiny_private(file: &str) -> Arc<Model> {
    Model::open(tiny_dir().join(file), &ModelOptions::default()).expect("the tiny model loads")
}

/// The real f32 model, an instance of its own (see [`tiny_private`]).
pub fn real_private() -> Arc<Model> {
    Model::open(model_file(real_dir(), "model.onnx"), &ModelOptions::default()).expect("the prepared model loads")
}
