//! ONNX Runtime discovery and model loading, through the real binary and library.

use std::{path::Path, process::Command};

use stateful_embedder::{
    conversation::Conversation,
    model::{FloatType, Model, ModelError},
};

use crate::support::{
    models as common,
    server::{BIN, output},
};

#[test]
/// The library loads through the discovery order and runs the tiny model, f32 and fp16, with the contract read off the graph.
fn tiny_models_load_and_run() {
    for (model, dtype) in [(common::tiny(), FloatType::F32), (common::tiny_fp16(), FloatType::F16)] {
        let spec = model.spec();
        assert_eq!(
            (spec.layers, spec.kv_heads, spec.head_dim, spec.hidden_size),
            (2, 2, 16, 64)
        );
        assert_eq!(spec.kv_dtype, dtype);
        assert!(spec.has_position_ids);
        let mut conv = Conversation::new(&model, Default::default()).unwrap();
        let v = conv.embed("Hello world").unwrap();
        assert_eq!(
            v.len(),
            model.embedding_head().expect("a base model has its head").dimensions,
            "the defaults: PROBE_MEAN through the head"
        );
        assert!(v.iter().all(|x| x.is_finite()));
    }
    let lib = stateful_embedder::platform::onnxruntime::loaded_path().expect("a library was loaded");
    println!("ONNX Runtime loaded from {}", lib.display());
}

#[test]
/// A named library that does not load is a one-line error saying how to install one; no silent fall-back.
fn missing_onnxruntime_is_a_one_line_error() {
    for (flag, env) in [
        (Some("/nonexistent/libonnxruntime.so"), None),
        (None, Some("/nonexistent/libort.so")),
    ] {
        let mut cmd = Command::new(BIN);
        cmd.args(["serve", "--addr", "127.0.0.1:0", "--model"])
            .arg(common::tiny_dir());
        if let Some(f) = flag {
            cmd.args(["--onnxruntime", f]);
        }
        cmd.env("ORT_DYLIB_PATH", env.unwrap_or(""));
        let out = output(&mut cmd);
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        let errors: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
        assert_eq!(errors.len(), 1, "{stderr}");
        assert!(errors[0].contains("make setup"), "{stderr}");
        assert!(errors[0].contains("/nonexistent/"), "{stderr}");
        assert!(String::from_utf8_lossy(&out.stdout).is_empty(), "nothing was served");
    }
}

#[test]
/// A model without tokenizer.json refuses to load, with a clear error (never a made-up tokenization).
fn missing_tokenizer_refuses_to_load() {
    let _ = common::tiny(); // the runtime is loaded
    let dir = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(common::tiny_dir().join("model.onnx"), dir.path().join("model.onnx")).unwrap();
    let err = Model::open(dir.path(), &Default::default()).unwrap_err();
    assert!(matches!(err, ModelError::Tokenizer(_)), "{err}");
    assert!(err.to_string().contains("tokenizer.json"), "{err}");
}

#[test]
/// A path that is not a model says so.
fn missing_model_file_is_clear() {
    let err = Model::open(Path::new("/nonexistent/model-dir"), &Default::default()).unwrap_err();
    assert!(err.to_string().contains("make models"), "{err}");
}
