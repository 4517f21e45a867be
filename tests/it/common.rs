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

/// The length of the tiny model's default vectors (PROBE_MEAN through its
/// learned head: each of the two 64-wide vectors whitened in full, side by side).
pub fn tiny_dims() -> usize {
    tiny().embedding_head().dimensions
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
/// (for a pooling that probes, also one call over `ids` followed by the
/// probe's tokens, its last row), standardised with the model's statistics
/// or head as the options say, truncated and normalised. Written from the
/// documented rules, not with the code under test.
pub fn oracle(model: &Model, ids: &[u32], span: Range<usize>, options: &ConversationOptions) -> Vec<f32> {
    let probe = || {
        let mut all = ids.to_vec();
        all.extend_from_slice(model.probe_ids());
        let n = all.len();
        let (hidden, _) = model
            .forward(&all, &model.empty_cache(), n - 1..n)
            .expect("the oracle's forward pass runs");
        hidden.row(0).to_vec()
    };
    let hidden = model.spec().hidden_size;
    let whiten = options.standardize == Standardize::Whiten;
    let (v, dims) = match options.pooling {
        Pooling::ProbeMean => {
            let (p, m) = (probe(), pool(model, ids, span, Pooling::Mean));
            if options.standardize == Standardize::Head {
                // y = [unit((p - mu_p) P_p), unit((m - mu_m) P_m)] H.
                let head = model.embedding_head();
                let mut x = unit(affine(
                    &p,
                    &head.probe.mean,
                    &head.probe.proj,
                    head.probe.k,
                    head.probe.k,
                ));
                x.extend(unit(affine(
                    &m,
                    &head.mean.mean,
                    &head.mean.proj,
                    head.mean.k,
                    head.mean.k,
                )));
                let zero = vec![0.0; x.len()];
                let y = affine(&x, &zero, &head.matrix, head.dimensions, head.dimensions);
                (y, options.dimensions.unwrap_or(head.dimensions).min(head.dimensions))
            } else {
                // Each part standardised, cut to its half, normalised; side by side.
                let max = 2 * hidden;
                let dims = options
                    .dimensions
                    .unwrap_or(if whiten { 2 * DEFAULT_WHITEN_COMPONENTS } else { max })
                    .min(max);
                let mut v = unit(standardized(model, "probe", p, options.standardize, dims.div_ceil(2)));
                v.extend(unit(standardized(model, "mean", m, options.standardize, dims / 2)));
                (v, dims)
            }
        }
        single => {
            let (key, v) = match single {
                Pooling::Probe => ("probe", probe()),
                Pooling::Mean => ("mean", pool(model, ids, span, Pooling::Mean)),
                _ => ("last_token", pool(model, ids, span, Pooling::LastToken)),
            };
            let dims = options
                .dimensions
                .unwrap_or(if whiten { DEFAULT_WHITEN_COMPONENTS } else { hidden })
                .min(hidden);
            (standardized(model, key, v, options.standardize, dims), dims)
        }
    };
    truncate_and_normalize(v, dims, options.normalize)
}

/// One vector standardised with the statistics `key` (z-scored under
/// HEAD, whitened to `k` components under WHITEN), cut to `k` components.
fn standardized(model: &Model, key: &str, mut v: Vec<f32>, standardize: Standardize, k: usize) -> Vec<f32> {
    let stats = model.embedding_stats().get(key);
    let hidden = v.len();
    match standardize {
        Standardize::None => {}
        Standardize::Zscore | Standardize::Head => {
            for (i, x) in v.iter_mut().enumerate() {
                *x = (*x - stats.mean[i]) * stats.inv_std[i];
            }
        }
        Standardize::Whiten => v = affine(&v, &stats.mean, &stats.whiten, hidden, k),
    }
    v.truncate(k);
    v
}

/// y_j = sum_i (x_i - mean_i) W[i, j] for j < keep, W row-major with `cols` columns.
fn affine(x: &[f32], mean: &[f32], w: &[f32], cols: usize, keep: usize) -> Vec<f32> {
    (0..keep.min(cols))
        .map(|j| {
            x.iter()
                .zip(mean)
                .enumerate()
                .map(|(i, (x, m))| f64::from(x - m) * f64::from(w[i * cols + j]))
                .sum::<f64>() as f32
        })
        .collect()
}

fn unit(v: Vec<f32>) -> Vec<f32> {
    let n = v.len();
    truncate_and_normalize(v, n, true)
}

/// Mean or last-token pooling of one empty-cache call over `ids`.
fn pool(model: &Model, ids: &[u32], span: Range<usize>, pooling: Pooling) -> Vec<f32> {
    let (hidden, _) = model
        .forward(ids, &model.empty_cache(), span.clone())
        .expect("the oracle's forward pass runs");
    assert_eq!(hidden.rows(), span.len());
    let width = hidden.width;
    if pooling == Pooling::LastToken {
        return hidden.row(hidden.rows() - 1).to_vec();
    }
    let mut sum = vec![0f64; width];
    for r in 0..hidden.rows() {
        for (s, v) in sum.iter_mut().zip(hidden.row(r)) {
            *s += f64::from(*v);
        }
    }
    sum.iter().map(|s| (s / hidden.rows() as f64) as f32).collect()
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
