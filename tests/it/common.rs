//! Shared helpers: model locations, shared loaded models, the oracle, vector comparison.

use std::{
    ops::Range,
    path::PathBuf,
    sync::{Arc, OnceLock},
};

use stateful_embedder::{
    conversation::{ConversationOptions, Pooling, finish_vector},
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

/// The model file, or `None` (with a printed reason) when it is not prepared
/// and `SE_REQUIRE_MODELS` is unset. Under `make test` a missing model fails.
pub fn model_file(dir: PathBuf, file: &str) -> Option<PathBuf> {
    let path = dir.join(file);
    if path.exists() {
        return Some(path);
    }
    let reason = format!("{} is not prepared (run `make models`)", path.display());
    if std::env::var_os("SE_REQUIRE_MODELS").is_some_and(|v| v == "1") {
        panic!("{reason}");
    }
    eprintln!("SKIPPED: {reason}");
    None
}

fn load(cell: &'static OnceLock<Option<Arc<Model>>>, dir: PathBuf, file: &str) -> Option<Arc<Model>> {
    cell.get_or_init(|| {
        let path = model_file(dir, file)?;
        Some(Model::open(&path, &ModelOptions::default()).expect("the prepared model loads"))
    })
    .clone()
}

pub fn tiny() -> Arc<Model> {
    static CELL: OnceLock<Option<Arc<Model>>> = OnceLock::new();
    load(&CELL, tiny_dir(), "model.onnx").expect("the tiny model is always prepared by the tests' set-up")
}

pub fn tiny_fp16() -> Arc<Model> {
    static CELL: OnceLock<Option<Arc<Model>>> = OnceLock::new();
    load(&CELL, tiny_dir(), "model_fp16.onnx").expect("the tiny model is always prepared by the tests' set-up")
}

pub fn real() -> Option<Arc<Model>> {
    static CELL: OnceLock<Option<Arc<Model>>> = OnceLock::new();
    load(&CELL, real_dir(), "model.onnx")
}

/// The oracle: one call with an empty cache over `ids`, pooled over `span`.
pub fn oracle(model: &Model, ids: &[u32], span: Range<usize>, options: &ConversationOptions) -> Vec<f32> {
    let (hidden, _) = model
        .forward(ids, &model.empty_cache(), span.clone())
        .expect("the oracle's forward pass runs");
    assert_eq!(hidden.rows(), span.len());
    let width = hidden.width;
    let pooled = match options.pooling {
        Pooling::Mean => {
            let mut sum = vec![0f64; width];
            for r in 0..hidden.rows() {
                for (s, v) in sum.iter_mut().zip(hidden.row(r)) {
                    *s += f64::from(*v);
                }
            }
            sum.iter().map(|s| (s / hidden.rows() as f64) as f32).collect()
        }
        Pooling::LastToken => hidden.row(hidden.rows() - 1).to_vec(),
    };
    finish_vector(pooled, options.output_dimensions(width), options.normalize)
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

/// f32: chunked and one-shot prefill run the same arithmetic on ONNX Runtime
/// CPU; only GEMM blocking can differ.
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

/// The real f32 model, an instance of its own (see [`tiny_private`]), or
/// `None` as [`model_file`] says.
pub fn real_private() -> Option<Arc<Model>> {
    let path = model_file(real_dir(), "model.onnx")?;
    Some(Model::open(&path, &ModelOptions::default()).expect("the prepared model loads"))
}
