//! Finding and loading ONNX Runtime.
//!
//! `ort` is built with `load-dynamic`: the shared library is opened at run time
//! with [`ort::init_from`], which must happen before any other `ort` call. The
//! library comes from the PyPI `onnxruntime` wheel, which ships only the
//! versioned name (`libonnxruntime.so.1.x.y`), so it is searched for in this
//! order:
//!
//! 1. an explicit path (the server's `--onnxruntime` flag),
//! 2. `ORT_DYLIB_PATH`,
//! 3. the project venv: `$VIRTUAL_ENV`, `./.venv`, and this crate's `.venv`
//!    (where `make setup` installs `models/requirements.txt`),
//! 4. the system library path (`libonnxruntime.so`).
//!
//! A path the user names (1 or 2) is the only candidate: if it does not load,
//! that is the error, rather than a silent fall-back to another library.
//! Otherwise the first of 3 and 4 that loads wins. The process keeps the
//! library it loaded for its lifetime.

use std::{
    path::{Path, PathBuf},
    sync::OnceLock,
};

use ort::environment::Environment;

/// What to tell a user who has no ONNX Runtime.
pub const INSTALL_HINT: &str = "run `make setup` (installs the onnxruntime wheel into .venv), \
     or pass --onnxruntime PATH / set ORT_DYLIB_PATH to a libonnxruntime.so";

/// ONNX Runtime could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum RuntimeError {
    /// No candidate library loaded.
    #[error("ONNX Runtime not found (tried {tried}); {INSTALL_HINT}")]
    NotFound {
        /// The candidates tried, in order, with why each failed.
        tried: String,
    },
    /// The library loaded but the environment could not be created.
    #[error("ONNX Runtime loaded from {path} but its environment failed")]
    Environment {
        /// The library that loaded.
        path: PathBuf,
        /// The runtime's own error.
        #[source]
        source: ort::Error,
    },
}

struct Loaded {
    path: PathBuf,
    environment: Environment,
}

static LOADED: OnceLock<Loaded> = OnceLock::new();

/// The candidates for the library, in discovery order.
pub fn candidates(explicit: Option<&Path>) -> Vec<PathBuf> {
    if let Some(p) = explicit {
        return vec![p.to_path_buf()];
    }
    if let Some(p) = std::env::var_os("ORT_DYLIB_PATH").filter(|p| !p.is_empty()) {
        return vec![PathBuf::from(p)];
    }
    let mut out = Vec::new();
    let mut venvs = Vec::new();
    if let Some(v) = std::env::var_os("VIRTUAL_ENV").filter(|p| !p.is_empty()) {
        venvs.push(PathBuf::from(v));
    }
    venvs.push(PathBuf::from(".venv"));
    venvs.push(Path::new(env!("CARGO_MANIFEST_DIR")).join(".venv"));
    for venv in venvs {
        out.extend(venv_libraries(&venv));
    }
    out.push(PathBuf::from("libonnxruntime.so"));
    out
}

/// `libonnxruntime.so*` files of the onnxruntime wheel in a venv, newest first.
fn venv_libraries(venv: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let Ok(lib) = std::fs::read_dir(venv.join("lib")) else {
        return found;
    };
    for python in lib.flatten() {
        let capi = python.path().join("site-packages/onnxruntime/capi");
        let Ok(files) = std::fs::read_dir(&capi) else {
            continue;
        };
        for f in files.flatten() {
            let name = f.file_name();
            if name.to_string_lossy().starts_with("libonnxruntime.so") {
                found.push(f.path());
            }
        }
    }
    found.sort();
    found.reverse();
    found
}

/// Loads ONNX Runtime (once per process) and returns its environment.
///
/// Later calls return the environment of the first successful load, whatever
/// `explicit` says: a process can hold only one ONNX Runtime.
///
/// # Errors
/// [`RuntimeError::NotFound`] when no candidate loads, with each failure.
pub fn environment(explicit: Option<&Path>) -> Result<&'static Environment, RuntimeError> {
    if let Some(l) = LOADED.get() {
        return Ok(&l.environment);
    }
    let mut tried = Vec::new();
    for path in candidates(explicit) {
        if path.components().count() > 1 && !path.exists() {
            tried.push(format!("{}: no such file", path.display()));
            continue;
        }
        let path = path.canonicalize().unwrap_or(path);
        match ort::init_from(&path) {
            Ok(builder) => {
                let environment =
                    builder
                        .with_name("stateful-embedder")
                        .build()
                        .map_err(|source| RuntimeError::Environment {
                            path: path.clone(),
                            source,
                        })?;
                let loaded = LOADED.get_or_init(|| Loaded { path, environment });
                tracing::info!(path = %loaded.path.display(), "ONNX Runtime loaded");
                return Ok(&loaded.environment);
            }
            Err(e) => tried.push(format!("{}: {e}", path.display())),
        }
    }
    Err(RuntimeError::NotFound {
        tried: tried.join("; "),
    })
}

/// The library the process loaded, if any.
pub fn loaded_path() -> Option<&'static Path> {
    LOADED.get().map(|l| l.path.as_path())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A named library is the only candidate; otherwise venvs come before the system path.
    #[test]
    fn discovery_order() {
        let named = Path::new("/opt/ort/libonnxruntime.so.1.99.0");
        assert_eq!(candidates(Some(named)), vec![named.to_path_buf()]);
        let implicit = candidates(None);
        if std::env::var_os("ORT_DYLIB_PATH").is_none_or(|p| p.is_empty()) {
            assert_eq!(implicit.last(), Some(&PathBuf::from("libonnxruntime.so")));
            let venv_lib = implicit
                .iter()
                .position(|p| p.to_string_lossy().contains("site-packages/onnxruntime/capi"));
            if let Some(i) = venv_lib {
                assert!(i < implicit.len() - 1, "venv libraries come before the system path");
            }
        }
    }
}
