//! Where the prepared models are, and loaded instances shared by the tests.
//!
//! A missing model is a failure ("run `make models`"), never a skip.

use std::{
    path::PathBuf,
    sync::{Arc, OnceLock},
};

use stateful_embedder::model::{Model, ModelOptions};

pub fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn tiny_dir() -> PathBuf {
    root().join("models/tiny")
}

pub fn tiny_qwen3_dir() -> PathBuf {
    root().join("models/tiny-qwen3")
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
    tiny().embedding_head().expect("a base model has its head").dimensions
}

pub fn tiny_fp16() -> Arc<Model> {
    static CELL: OnceLock<Arc<Model>> = OnceLock::new();
    load(&CELL, tiny_dir(), "model_fp16.onnx")
}

/// The tiny fixture in Qwen3's architecture (`file`: model.onnx or
/// model_fp16.onnx), an instance of its own.
pub fn tiny_qwen3(file: &str) -> Arc<Model> {
    Model::open(model_file(tiny_qwen3_dir(), file), &ModelOptions::default()).expect("the tiny qwen3 model loads")
}

/// The real f32 model, shared.
pub fn real() -> Arc<Model> {
    static CELL: OnceLock<Arc<Model>> = OnceLock::new();
    load(&CELL, real_dir(), "model.onnx")
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
