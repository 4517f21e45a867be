//! What turns a pooled hidden state into a good embedding, shipped beside
//! the model by `models/prepare.py`:
//!
//! * `embedding_stats.safetensors`: per pooling, the mean, the inverse
//!   standard deviation and the PCA whitening of the pooled vectors over the
//!   model tool's fixed background corpus (`models/background.jsonl`). Raw
//!   decoder states are anisotropic (a few outlier dimensions dominate every
//!   cosine); standardising or whitening removes that common part.
//! * `embedding_head.safetensors`: the learned head of
//!   [`crate::conversation::Pooling::ProbeMean`]: the probe's and the mean's
//!   vectors, each whitened and L2-normalised, side by side, times a matrix
//!   fitted with a contrastive loss on docstring → code pairs and
//!   conversations (`models/head_pairs.jsonl`). It carries its own whitening,
//!   so it is exactly what was fitted whatever the local statistics.
//!
//! The statistics are required; the head is required when the model's card
//! (`embedding.json`, see the `card` module) makes PROBE_MEAN its pooling. A
//! model without them, or with a profile of another width, model or probe,
//! does not load (a silently raw vector is a silently worse embedding).

use std::{collections::BTreeMap, path::Path};

use super::ModelError;

/// The statistics file beside the model.
pub const STATS_FILE: &str = "embedding_stats.safetensors";
/// The learned head's file beside the model.
pub const HEAD_FILE: &str = "embedding_head.safetensors";
/// The statistics format this server reads.
pub const STATS_FORMAT: &str = "3";
/// The head format this server reads.
pub const HEAD_FORMAT: &str = "1";

/// The pooled vectors the statistics describe, one set per pooling.
pub const STATS_POOLINGS: [&str; 3] = ["mean", "last_token", "probe"];

/// `x · m` for a row-major `m` of `cols` columns, keeping the first `keep`
/// columns (sums in f64).
fn project(x: impl IntoIterator<Item = f64>, m: &[f32], cols: usize, keep: usize) -> Vec<f32> {
    let keep = keep.min(cols);
    let mut y = vec![0f64; keep];
    for (i, xi) in x.into_iter().enumerate() {
        let row = &m[i * cols..i * cols + keep];
        for (yj, w) in y.iter_mut().zip(row) {
            *yj += xi * f64::from(*w);
        }
    }
    y.into_iter().map(|v| v as f32).collect()
}

/// `v` scaled to unit L2 norm (in f64); a zero vector stays zero.
pub fn unit(mut v: Vec<f32>) -> Vec<f32> {
    let norm = v.iter().map(|x| f64::from(*x).powi(2)).sum::<f64>().sqrt();
    if norm > 0.0 {
        for x in &mut v {
            *x = (f64::from(*x) / norm) as f32;
        }
    }
    v
}

/// One pooling's background statistics: per-dimension standardisation
/// `(x - mean) * inv_std`, and PCA whitening `(x - mean) · whiten`.
#[derive(Debug, Clone, PartialEq)]
pub struct Standardizer {
    /// The background mean.
    pub mean: Vec<f32>,
    /// 1 / the background standard deviation.
    pub inv_std: Vec<f32>,
    /// PCA whitening, `[hidden, hidden]` row-major: column j is the j-th
    /// principal direction (largest background variance first) over the
    /// square root of its variance.
    pub whiten: Vec<f32>,
}

impl Standardizer {
    /// Standardises `v` in place.
    pub fn apply(&self, v: &mut [f32]) {
        for ((x, m), s) in v.iter_mut().zip(&self.mean).zip(&self.inv_std) {
            *x = (*x - m) * s;
        }
    }

    /// The first `k` whitened components of `v` (sums in f64).
    pub fn whiten(&self, v: &[f32], k: usize) -> Vec<f32> {
        let centred = v.iter().zip(&self.mean).map(|(x, m)| f64::from(*x - m));
        project(centred, &self.whiten, self.mean.len(), k)
    }
}

/// The statistics of every pooling, and where they came from.
#[derive(Debug, Clone)]
pub struct EmbeddingStats {
    by_pooling: BTreeMap<String, Standardizer>,
    /// SHA-256 of the background corpus they were computed from.
    pub corpus_sha256: String,
    /// The model tool's version that wrote them.
    pub tool_version: String,
}

impl EmbeddingStats {
    /// The standardiser of one pooling (`"mean"`, `"last_token"`, `"probe"`).
    pub fn get(&self, pooling: &str) -> &Standardizer {
        &self.by_pooling[pooling]
    }

    /// Reads and checks the statistics of a model of width `hidden` named `name`.
    ///
    /// # Errors
    /// [`ModelError::Profile`] when the file is missing, malformed, of
    /// another format, model or width, or lacks a pooling.
    pub fn read(path: &Path, hidden: usize, name: &str) -> Result<EmbeddingStats, ModelError> {
        let file = ProfileFile::read(path, STATS_FORMAT, name, "the embedding statistics")?;
        let mut by_pooling = BTreeMap::new();
        for pooling in STATS_POOLINGS {
            let standardizer = Standardizer {
                mean: file.tensor(&format!("{pooling}.mean"), &[hidden], hidden)?,
                inv_std: file.tensor(&format!("{pooling}.inv_std"), &[hidden], hidden)?,
                whiten: file.tensor(&format!("{pooling}.whiten"), &[hidden, hidden], hidden)?,
            };
            by_pooling.insert(pooling.to_string(), standardizer);
        }
        Ok(EmbeddingStats {
            by_pooling,
            corpus_sha256: file.field("corpus_sha256"),
            tool_version: file.field("tool_version"),
        })
    }
}

/// One part of the head's input: `(x - mean) · proj`, `proj` `[hidden, k]`
/// row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct Whitening {
    /// The mean subtracted.
    pub mean: Vec<f32>,
    /// The projection, `[hidden, k]` row-major.
    pub proj: Vec<f32>,
    /// Its components.
    pub k: usize,
}

impl Whitening {
    /// `(v - mean) · proj`.
    pub fn apply(&self, v: &[f32]) -> Vec<f32> {
        let centred = v.iter().zip(&self.mean).map(|(x, m)| f64::from(*x - m));
        project(centred, &self.proj, self.k, self.k)
    }
}

/// The learned head of [`crate::conversation::Pooling::ProbeMean`]:
/// `[unit(probe · whitening), unit(mean · whitening)] · matrix`, its output
/// components ordered by their variance over the background corpus (so
/// truncation keeps the most telling ones).
#[derive(Debug, Clone)]
pub struct EmbeddingHead {
    /// The probe vector's whitening.
    pub probe: Whitening,
    /// The mean vector's whitening.
    pub mean: Whitening,
    /// `[probe.k + mean.k, dimensions]` row-major.
    pub matrix: Vec<f32>,
    /// Output components.
    pub dimensions: usize,
    /// SHA-256 of the pairs it was fitted on (`models/head_pairs.jsonl`).
    pub pairs_sha256: String,
    /// The model tool's version that fitted it.
    pub tool_version: String,
}

impl EmbeddingHead {
    /// The head's input: both parts whitened, each L2-normalised, side by side.
    pub fn input(&self, probe: &[f32], mean: &[f32]) -> Vec<f32> {
        let mut x = unit(self.probe.apply(probe));
        x.extend(unit(self.mean.apply(mean)));
        x
    }

    /// The head's output for a turn's probe and mean vectors.
    pub fn apply(&self, probe: &[f32], mean: &[f32]) -> Vec<f32> {
        let x = self.input(probe, mean);
        project(
            x.into_iter().map(f64::from),
            &self.matrix,
            self.dimensions,
            self.dimensions,
        )
    }

    /// Reads and checks the head of a model of width `hidden` named `name`
    /// whose probe is `probe`.
    ///
    /// # Errors
    /// [`ModelError::Profile`] when the file is missing, malformed, of
    /// another format, model, width or probe, or inconsistent in its shapes.
    pub fn read(path: &Path, hidden: usize, name: &str, probe: &str) -> Result<EmbeddingHead, ModelError> {
        let file = ProfileFile::read(path, HEAD_FORMAT, name, "the embedding head")?;
        if file.field("probe") != probe {
            return Err(file.bad(format!(
                "the head was fitted with the probe {:?}, not this model's {probe:?} (embedding.json)",
                file.field("probe")
            )));
        }
        let part = |key: &str| -> Result<Whitening, ModelError> {
            let k = file.shape(&format!("{key}.proj"))?.get(1).copied().unwrap_or(0);
            if k == 0 || k > hidden {
                return Err(file.bad(format!("tensor \"{key}.proj\" must have 1 to {hidden} columns")));
            }
            Ok(Whitening {
                mean: file.tensor(&format!("{key}.mean"), &[hidden], hidden)?,
                proj: file.tensor(&format!("{key}.proj"), &[hidden, k], hidden)?,
                k,
            })
        };
        let (probe, mean) = (part("probe")?, part("mean")?);
        let inputs = probe.k + mean.k;
        let dimensions = file.shape("head")?.get(1).copied().unwrap_or(0);
        if dimensions == 0 {
            return Err(file.bad("tensor \"head\" has no columns".to_string()));
        }
        let matrix = file.tensor("head", &[inputs, dimensions], hidden)?;
        Ok(EmbeddingHead {
            probe,
            mean,
            matrix,
            dimensions,
            pairs_sha256: file.field("pairs_sha256"),
            tool_version: file.field("tool_version"),
        })
    }
}

/// A profile file read and its header checked: the tensors looked up one by
/// one the same way.
struct ProfileFile<'a> {
    path: &'a Path,
    meta: BTreeMap<String, String>,
    tensors: Tensors,
}

impl<'a> ProfileFile<'a> {
    fn read(path: &'a Path, format: &str, name: &str, what: &str) -> Result<ProfileFile<'a>, ModelError> {
        let bad = |reason: String| ModelError::Profile {
            path: path.to_path_buf(),
            reason,
        };
        let bytes = std::fs::read(path).map_err(|e| {
            bad(format!(
                "cannot read {what} ({e}); run `make models` (or `models/prepare.py import` for an export of your own) to write them"
            ))
        })?;
        let (meta, tensors) = parse_safetensors(&bytes).map_err(|e| bad(format!("not a safetensors file: {e}")))?;
        let file = ProfileFile { path, meta, tensors };
        if file.field("format") != format {
            return Err(file.bad(format!(
                "format {:?}, this server reads {format:?} (run `make models` to rewrite it)",
                file.field("format")
            )));
        }
        if file.field("model") != name {
            return Err(file.bad(format!(
                "{what} of model {:?}, not of this model {name:?}",
                file.field("model")
            )));
        }
        Ok(file)
    }

    fn bad(&self, reason: String) -> ModelError {
        ModelError::Profile {
            path: self.path.to_path_buf(),
            reason,
        }
    }

    fn field(&self, key: &str) -> String {
        self.meta.get(key).cloned().unwrap_or_default()
    }

    fn shape(&self, key: &str) -> Result<&[usize], ModelError> {
        self.tensors
            .get(key)
            .map(|(shape, _)| shape.as_slice())
            .ok_or_else(|| self.bad(format!("no tensor {key:?}")))
    }

    /// A tensor: present, of the shape the model needs, finite.
    fn tensor(&self, key: &str, want: &[usize], hidden: usize) -> Result<Vec<f32>, ModelError> {
        let (shape, values) = self
            .tensors
            .get(key)
            .ok_or_else(|| self.bad(format!("no tensor {key:?}")))?;
        if shape != want {
            return Err(self.bad(format!(
                "tensor {key:?} has shape {shape:?}, want {want:?} (the model's hidden size is {hidden})"
            )));
        }
        if values.iter().any(|v| !v.is_finite()) {
            return Err(self.bad(format!("tensor {key:?} holds a non-finite value")));
        }
        Ok(values.clone())
    }
}

type Tensors = BTreeMap<String, (Vec<usize>, Vec<f32>)>;

/// A safetensors file's metadata and its tensors, read with the
/// `safetensors` crate. Only F32 tensors are accepted.
fn parse_safetensors(bytes: &[u8]) -> Result<(BTreeMap<String, String>, Tensors), String> {
    let (_, header) = safetensors::SafeTensors::read_metadata(bytes).map_err(|e| e.to_string())?;
    let meta = header.metadata().clone().unwrap_or_default().into_iter().collect();
    let file = safetensors::SafeTensors::deserialize(bytes).map_err(|e| e.to_string())?;
    let mut tensors = BTreeMap::new();
    for (name, view) in file.tensors() {
        if view.dtype() != safetensors::Dtype::F32 {
            return Err(format!("tensor {name:?} is {:?}, not F32", view.dtype()));
        }
        let values = view
            .data()
            .chunks_exact(4)
            .map(|c| f32::from_le_bytes(c.try_into().expect("4 bytes")))
            .collect();
        tensors.insert(name, (view.shape().to_vec(), values));
    }
    Ok((meta, tensors))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn safetensors(meta: &str, tensors: &[(&str, Vec<f32>)]) -> Vec<u8> {
        let shaped: Vec<(&str, Vec<f32>, Vec<usize>)> =
            tensors.iter().map(|(k, v)| (*k, v.clone(), vec![v.len()])).collect();
        safetensors_shaped(meta, &shaped)
    }

    fn safetensors_shaped(meta: &str, tensors: &[(&str, Vec<f32>, Vec<usize>)]) -> Vec<u8> {
        let mut header = format!("{{\"__metadata__\":{meta}");
        let mut data = Vec::new();
        for (name, v, shape) in tensors {
            let start = data.len();
            data.extend(v.iter().flat_map(|x| x.to_le_bytes()));
            let shape: Vec<String> = shape.iter().map(usize::to_string).collect();
            header += &format!(
                ",\"{name}\":{{\"dtype\":\"F32\",\"shape\":[{}],\"data_offsets\":[{start},{}]}}",
                shape.join(","),
                data.len()
            );
        }
        header += "}";
        let mut out = (header.len() as u64).to_le_bytes().to_vec();
        out.extend(header.as_bytes());
        out.extend(data);
        out
    }

    fn full(meta: &str, width: usize) -> Vec<u8> {
        let mut t = Vec::new();
        for p in STATS_POOLINGS {
            t.push((format!("{p}.mean"), vec![1.0; width]));
            t.push((format!("{p}.inv_std"), vec![2.0; width]));
            // Whitening that keeps component i scaled by i + 1.
            let mut w = vec![0.0; width * width];
            for i in 0..width {
                w[i * width + i] = (i + 1) as f32;
            }
            t.push((format!("{p}.whiten"), w));
        }
        let t: Vec<(&str, Vec<f32>, Vec<usize>)> = t
            .iter()
            .map(|(k, v)| {
                let shape = if k.ends_with(".whiten") {
                    vec![width, width]
                } else {
                    vec![width]
                };
                (k.as_str(), v.clone(), shape)
            })
            .collect();
        safetensors_shaped(meta, &t)
    }

    fn write(bytes: &[u8]) -> tempfile::NamedTempFile {
        let mut f = tempfile::NamedTempFile::new().expect("a temporary file");
        std::io::Write::write_all(&mut f, bytes).expect("written");
        f
    }

    const META: &str = r#"{"format":"3","model":"m","corpus_sha256":"abc","tool_version":"5"}"#;
    const HEAD_META: &str = r#"{"format":"1","model":"m","probe":"P","pairs_sha256":"def","tool_version":"5"}"#;

    /// A head over width 3: each part whitened to 2 components (the probe's
    /// scaled by 3 and 4 after subtracting 1; the mean's are its first two
    /// coordinates), then a matrix that swaps the first two inputs and sums
    /// the last two.
    fn head_file(meta: &str) -> Vec<u8> {
        let probe_proj = vec![3.0, 0.0, 0.0, 4.0, 0.0, 0.0];
        let mean_proj = vec![1.0, 0.0, 0.0, 1.0, 0.0, 0.0];
        let matrix = vec![0.0, 1.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 0.0, 0.0, 1.0];
        safetensors_shaped(
            meta,
            &[
                ("probe.mean", vec![1.0; 3], vec![3]),
                ("probe.proj", probe_proj, vec![3, 2]),
                ("mean.mean", vec![0.0; 3], vec![3]),
                ("mean.proj", mean_proj, vec![3, 2]),
                ("head", matrix, vec![4, 3]),
            ],
        )
    }

    #[test]
    fn reads_and_applies() {
        let f = write(&full(META, 3));
        let stats = EmbeddingStats::read(f.path(), 3, "m").expect("valid statistics load");
        assert_eq!(stats.corpus_sha256, "abc");
        let mut v = vec![1.0, 2.0, 4.0];
        stats.get("mean").apply(&mut v);
        assert_eq!(v, vec![0.0, 2.0, 6.0], "(x - 1) * 2");
        assert_eq!(
            stats.get("probe").whiten(&[2.0, 3.0, 4.0], 2),
            vec![1.0, 4.0],
            "(x - 1) · diag(1, 2, 3), the first two components"
        );
    }

    /// Whitening with a matrix that is neither symmetric nor diagonal, made
    /// here: the loaded statistics give `(x - mean) · W` (row-major, column j
    /// the j-th direction), computed by hand below; `W` transposed would give
    /// other numbers, so a reader that swapped rows and columns fails.
    #[test]
    fn whitening_is_x_minus_mean_times_w() {
        // W = R(30°) · diag(2, 3) with a shear in the last row: w[i][j].
        let (c, s) = (30f32.to_radians().cos(), 30f32.to_radians().sin());
        let w = [[2.0 * c, -3.0 * s, 0.0], [2.0 * s, 3.0 * c, 0.0], [0.5, -0.25, 4.0]];
        let flat: Vec<f32> = w.iter().flatten().copied().collect();
        let mean = vec![0.5, -1.0, 2.0];
        let mut t: Vec<(String, Vec<f32>, Vec<usize>)> = Vec::new();
        for p in STATS_POOLINGS {
            t.push((format!("{p}.mean"), mean.clone(), vec![3]));
            t.push((format!("{p}.inv_std"), vec![1.0; 3], vec![3]));
            t.push((format!("{p}.whiten"), flat.clone(), vec![3, 3]));
        }
        let t: Vec<(&str, Vec<f32>, Vec<usize>)> =
            t.iter().map(|(k, v, s)| (k.as_str(), v.clone(), s.clone())).collect();
        let f = write(&safetensors_shaped(META, &t));
        let stats = EmbeddingStats::read(f.path(), 3, "m").expect("valid statistics load");
        let x = [1.5f32, 2.0, -1.0];
        let centred: Vec<f32> = x.iter().zip(&mean).map(|(a, b)| a - b).collect();
        let by_hand: Vec<f32> = (0..3)
            .map(|j| centred[0] * w[0][j] + centred[1] * w[1][j] + centred[2] * w[2][j])
            .collect();
        let transposed: Vec<f32> = (0..3)
            .map(|j| centred[0] * w[j][0] + centred[1] * w[j][1] + centred[2] * w[j][2])
            .collect();
        let got = stats.get("mean").whiten(&x, 3);
        for (g, h) in got.iter().zip(&by_hand) {
            assert!((g - h).abs() < 1e-5, "{got:?} vs {by_hand:?}");
        }
        assert!(
            got.iter().zip(&transposed).any(|(g, t)| (g - t).abs() > 0.1),
            "W is not its transpose"
        );
        assert_eq!(stats.get("mean").whiten(&x, 2).len(), 2, "the first k components");
    }

    #[test]
    fn the_head_whitens_normalises_and_projects() {
        let f = write(&head_file(HEAD_META));
        let head = EmbeddingHead::read(f.path(), 3, "m", "P").expect("a valid head loads");
        assert_eq!((head.probe.k, head.mean.k, head.dimensions), (2, 2, 3));
        // probe (2, 2, 9) -> (3, 4) -> unit (0.6, 0.8); mean (0, 5, 1) -> (0, 5) -> (0, 1).
        let input = head.input(&[2.0, 2.0, 9.0], &[0.0, 5.0, 1.0]);
        assert_eq!(input, vec![0.6, 0.8, 0.0, 1.0]);
        assert_eq!(head.apply(&[2.0, 2.0, 9.0], &[0.0, 5.0, 1.0]), vec![0.8, 0.6, 1.0]);
    }

    #[test]
    fn a_head_of_another_model_width_or_probe_does_not_load() {
        let f = write(&head_file(HEAD_META));
        let probe = EmbeddingHead::read(f.path(), 3, "m", "Q").unwrap_err().to_string();
        assert!(probe.contains("fitted with the probe"), "{probe}");
        let width = EmbeddingHead::read(f.path(), 4, "m", "P").unwrap_err().to_string();
        assert!(width.contains("hidden size is 4"), "{width}");
        let model = EmbeddingHead::read(f.path(), 3, "other", "P").unwrap_err().to_string();
        assert!(model.contains("not of this model"), "{model}");
        let g = write(&head_file(r#"{"format":"0","model":"m","probe":"P"}"#));
        let format = EmbeddingHead::read(g.path(), 3, "m", "P").unwrap_err().to_string();
        assert!(format.contains("format"), "{format}");
        let missing = EmbeddingHead::read(Path::new("/nonexistent/h"), 3, "m", "P")
            .unwrap_err()
            .to_string();
        assert!(missing.contains("make models"), "{missing}");
    }

    #[test]
    fn a_mismatch_is_a_load_error() {
        let f = write(&full(META, 3));
        let width = EmbeddingStats::read(f.path(), 4, "m").unwrap_err().to_string();
        assert!(width.contains("hidden size is 4"), "{width}");
        let model = EmbeddingStats::read(f.path(), 3, "other").unwrap_err().to_string();
        assert!(model.contains("not of this model"), "{model}");
        let g = write(&full(r#"{"format":"0","model":"m"}"#, 3));
        let format = EmbeddingStats::read(g.path(), 3, "m").unwrap_err().to_string();
        assert!(format.contains("format"), "{format}");
        let h = write(&safetensors(META, &[("mean.mean", vec![0.0; 3])]));
        let missing = EmbeddingStats::read(h.path(), 3, "m").unwrap_err().to_string();
        assert!(missing.contains("no tensor \"mean.inv_std\""), "{missing}");
        let missing_file = EmbeddingStats::read(Path::new("/nonexistent/x"), 3, "m")
            .unwrap_err()
            .to_string();
        assert!(missing_file.contains("make models"), "{missing_file}");
        let garbage = write(b"\x05\0\0\0\0\0\0\0{nope");
        assert!(EmbeddingStats::read(garbage.path(), 3, "m").is_err());
    }
}
