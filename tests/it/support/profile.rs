//! What ships beside a model for embedding quality (statistics, learned
//! head, probe), read here with the `safetensors` crate and `serde_json`
//! rather than through the server's loaders, so that the oracle does not
//! share a reader with the code it checks (a transposed matrix on load would
//! otherwise cancel out).

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Mutex, OnceLock},
};

use super::tokens;

/// A row-major matrix.
#[derive(Debug, Clone)]
pub struct Matrix {
    pub rows: usize,
    pub cols: usize,
    pub data: Vec<f32>,
}

impl Matrix {
    /// `(x - mean) · self`, the first `keep` columns, summed in f64.
    pub fn affine(&self, x: &[f32], mean: &[f32], keep: usize) -> Vec<f32> {
        assert_eq!(x.len(), self.rows, "a vector of {} against {} rows", x.len(), self.rows);
        (0..keep.min(self.cols))
            .map(|j| {
                (0..self.rows)
                    .map(|i| f64::from(x[i] - mean[i]) * f64::from(self.data[i * self.cols + j]))
                    .sum::<f64>() as f32
            })
            .collect()
    }
}

/// One pooling's background statistics.
#[derive(Debug, Clone)]
pub struct Stats {
    pub mean: Vec<f32>,
    pub inv_std: Vec<f32>,
    pub whiten: Matrix,
}

/// The learned head: `[unit((p - probe_mean) probe_proj), unit((m - mean_mean) mean_proj)] matrix`.
#[derive(Debug, Clone)]
pub struct Head {
    pub probe_mean: Vec<f32>,
    pub probe_proj: Matrix,
    pub mean_mean: Vec<f32>,
    pub mean_proj: Matrix,
    pub matrix: Matrix,
}

/// Everything of one model directory.
#[derive(Debug)]
pub struct Profile {
    pub stats: HashMap<String, Stats>,
    /// The learned head, when the directory has one.
    pub head: Option<Head>,
    /// The probe's ids, by the reference tokenizer.
    pub probe_ids: Vec<u32>,
    /// The card's end token's id, when it names one.
    pub end_ids: Vec<u32>,
    /// The card's pooling, as written in embedding.json.
    pub pooling: String,
    /// Input type → (prefix, suffix) around the text.
    pub input_types: HashMap<String, (String, String)>,
}

fn tensors(path: &Path) -> HashMap<String, Matrix> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e} (run `make models`)", path.display()));
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    file.tensors()
        .into_iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), safetensors::Dtype::F32, "{name}");
            let data: Vec<f32> = view
                .data()
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
                .collect();
            let (rows, cols) = match view.shape() {
                [n] => (1, *n),
                [r, c] => (*r, *c),
                other => panic!("{name}: shape {other:?}"),
            };
            (name, Matrix { rows, cols, data })
        })
        .collect()
}

/// The profile of the model in `dir` (read once per directory).
pub fn of(dir: &Path) -> &'static Profile {
    static READ: OnceLock<Mutex<HashMap<PathBuf, &'static Profile>>> = OnceLock::new();
    let mut read = READ.get_or_init(Default::default).lock().unwrap();
    read.entry(dir.to_path_buf()).or_insert_with(|| {
        let mut t = tensors(&dir.join("embedding_stats.safetensors"));
        let mut take = |name: &str| t.remove(name).unwrap_or_else(|| panic!("no tensor {name}"));
        let mut stats = HashMap::new();
        for pooling in ["mean", "last_token", "probe"] {
            stats.insert(
                pooling.to_string(),
                Stats {
                    mean: take(&format!("{pooling}.mean")).data,
                    inv_std: take(&format!("{pooling}.inv_std")).data,
                    whiten: take(&format!("{pooling}.whiten")),
                },
            );
        }
        let head_file = dir.join("embedding_head.safetensors");
        let head = head_file.exists().then(|| {
            let mut h = tensors(&head_file);
            let mut take = |name: &str| h.remove(name).unwrap_or_else(|| panic!("no tensor {name}"));
            Head {
                probe_mean: take("probe.mean").data,
                probe_proj: take("probe.proj"),
                mean_mean: take("mean.mean").data,
                mean_proj: take("mean.proj"),
                matrix: take("head"),
            }
        });
        let templates: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("embedding.json")).unwrap()).unwrap();
        let probe = templates["probe"].as_str().expect("a probe").to_string();
        let input_types = templates["input_types"]
            .as_object()
            .expect("input types")
            .iter()
            .map(|(name, t)| {
                let (prefix, suffix) = t.as_str().unwrap().split_once("{text}").expect("{text}");
                (name.clone(), (prefix.to_string(), suffix.to_string()))
            })
            .collect();
        Box::leak(Box::new(Profile {
            stats,
            head,
            probe_ids: tokens::encode_in(dir, &probe),
            end_ids: templates["end_token"]
                .as_str()
                .map(|t| vec![tokens::token_id_in(dir, t)])
                .unwrap_or_default(),
            pooling: templates["pooling"].as_str().expect("a pooling").to_string(),
            input_types,
        }))
    })
}
