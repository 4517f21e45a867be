//! The oracle (the one-shot embedding written from the documented rules,
//! not with the code under test), vector comparison and the tolerances.

use std::ops::Range;

use stateful_embedder::{
    conversation::{ConversationOptions, DEFAULT_WHITEN_COMPONENTS, MeanOver, Pooling, Standardize},
    model::Model,
};

use super::profile::{self, Profile};

/// The oracle: one call with an empty cache over `ids`, pooled over `span`
/// (MEAN_OVER_CONVERSATION: over every row of `ids` that is not a special
/// token of the model's tokenizer.json; for a pooling that probes, also one call over `ids` followed by the
/// probe's tokens, its last row; for END_TOKEN, followed by the card's end
/// token), standardised with the model's statistics
/// or head as the options say, truncated and normalised. Written from the
/// documented rules, not with the code under test: the statistics, head and
/// probe are read by [`super::profile`], not by the server's loaders.
pub fn oracle(model: &Model, ids: &[u32], span: Range<usize>, options: &ConversationOptions) -> Vec<f32> {
    oracle_by(model, ids, span, options, &|ids, keep| one_shot(model, ids, keep))
}

/// A Converse stream's defaults as the proto documents them (on a base
/// model's card): PROBE_MEAN through the learned head, its mean over the
/// whole conversation. Written out here, not read from the server's own
/// defaults.
pub fn stream_defaults() -> ConversationOptions {
    ConversationOptions {
        pooling: Pooling::ProbeMean,
        standardize: Standardize::Head,
        mean_over: MeanOver::Conversation,
        ..ConversationOptions::default()
    }
}

/// How [`oracle_by`] runs the model over a sequence: the hidden rows of
/// `keep` (indices into `ids`).
pub type Run<'a> = &'a dyn Fn(&[u32], Range<usize>) -> Vec<Vec<f32>>;

/// The rows of `keep` of one call over `ids` with an empty cache.
pub fn one_shot(model: &Model, ids: &[u32], keep: Range<usize>) -> Vec<Vec<f32>> {
    let (hidden, _) = model
        .forward(ids, &model.empty_cache(), keep)
        .expect("the oracle's forward pass runs");
    (0..hidden.rows()).map(|r| hidden.row(r).to_vec()).collect()
}

/// [`oracle`] with the model run by `run` instead of in one shot: for the
/// negative controls, which run it wrongly on purpose.
pub fn oracle_by(
    model: &Model,
    ids: &[u32],
    span: Range<usize>,
    options: &ConversationOptions,
    run: Run<'_>,
) -> Vec<f32> {
    let dir = model
        .spec()
        .path
        .parent()
        .expect("a model file in a directory")
        .to_path_buf();
    let profile = profile::of(&dir);
    let pool = |pooling| match (pooling, options.mean_over) {
        (Pooling::Mean, MeanOver::Conversation) => {
            let special = special_ids(&dir);
            let rows = run(ids, 0..ids.len());
            let plain: Vec<&Vec<f32>> = rows
                .iter()
                .zip(ids)
                .filter(|(_, id)| !special.contains(id))
                .map(|(row, _)| row)
                .collect();
            mean(&plain)
        }
        _ => pool(run, ids, span.clone(), pooling),
    };
    // The last row of one call over `ids` followed by `after` (the probe,
    // or the card's end token).
    let appended = |after: &[u32]| {
        let mut all = ids.to_vec();
        all.extend_from_slice(after);
        let n = all.len();
        run(&all, n - 1..n).remove(0)
    };
    let probe = || appended(&profile.probe_ids);
    let hidden = model.spec().hidden_size;
    let whiten = options.standardize == Standardize::Whiten;
    let (v, dims) = match options.pooling {
        Pooling::ProbeMean => {
            let (p, m) = (probe(), pool(Pooling::Mean));
            if options.standardize == Standardize::Head {
                // y = [unit((p - mu_p) P_p), unit((m - mu_m) P_m)] H.
                let head = profile.head.as_ref().expect("HEAD on a model with a head");
                let mut x = unit(head.probe_proj.affine(&p, &head.probe_mean, head.probe_proj.cols));
                x.extend(unit(head.mean_proj.affine(&m, &head.mean_mean, head.mean_proj.cols)));
                let zero = vec![0.0; x.len()];
                let out = head.matrix.cols;
                let y = head.matrix.affine(&x, &zero, out);
                (y, options.dimensions.unwrap_or(out).min(out))
            } else {
                // Each part standardised, cut to its half, normalised; side by side.
                let max = 2 * hidden;
                let dims = options
                    .dimensions
                    .unwrap_or(if whiten { 2 * DEFAULT_WHITEN_COMPONENTS } else { max })
                    .min(max);
                let mut v = unit(standardized(profile, "probe", p, options.standardize, dims.div_ceil(2)));
                v.extend(unit(standardized(profile, "mean", m, options.standardize, dims / 2)));
                (v, dims)
            }
        }
        single => {
            let (key, v) = match single {
                Pooling::Probe => ("probe", probe()),
                Pooling::EndToken => ("end_token", appended(&profile.end_ids)),
                Pooling::Mean => ("mean", pool(Pooling::Mean)),
                _ => ("last_token", pool(Pooling::LastToken)),
            };
            let dims = options
                .dimensions
                .unwrap_or(if whiten { DEFAULT_WHITEN_COMPONENTS } else { hidden })
                .min(hidden);
            (standardized(profile, key, v, options.standardize, dims), dims)
        }
    };
    truncate_and_normalize(v, dims, options.normalize)
}

/// One vector standardised with the statistics `key` (z-scored under
/// HEAD, whitened to `k` components under WHITEN), cut to `k` components.
fn standardized(profile: &Profile, key: &str, mut v: Vec<f32>, standardize: Standardize, k: usize) -> Vec<f32> {
    let stats = || &profile.stats[key];
    match standardize {
        Standardize::None => {}
        Standardize::Zscore | Standardize::Head => {
            let stats = stats();
            for (i, x) in v.iter_mut().enumerate() {
                *x = (*x - stats.mean[i]) * stats.inv_std[i];
            }
        }
        Standardize::Whiten => v = stats().whiten.affine(&v, &stats().mean, k),
    }
    v.truncate(k);
    v
}

fn unit(v: Vec<f32>) -> Vec<f32> {
    let n = v.len();
    truncate_and_normalize(v, n, true)
}

/// The ids of the special tokens (`added_tokens` marked `special`) of the
/// model directory's tokenizer.json, read here, not by the server's tokenizer.
fn special_ids(dir: &std::path::Path) -> Vec<u32> {
    static READ: std::sync::Mutex<Vec<(std::path::PathBuf, Vec<u32>)>> = std::sync::Mutex::new(Vec::new());
    let mut read = READ.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if let Some((_, ids)) = read.iter().find(|(d, _)| d == dir) {
        return ids.clone();
    }
    let text = std::fs::read_to_string(dir.join("tokenizer.json")).expect("the model's tokenizer.json");
    let json: serde_json::Value = serde_json::from_str(&text).expect("tokenizer.json is JSON");
    let ids = json["added_tokens"]
        .as_array()
        .expect("tokenizer.json lists its added tokens")
        .iter()
        .filter(|t| t["special"].as_bool() == Some(true))
        .map(|t| u32::try_from(t["id"].as_u64().expect("an added token's id")).expect("a u32 id"))
        .collect::<Vec<u32>>();
    read.push((dir.to_path_buf(), ids.clone()));
    ids
}

/// The mean of `rows`, summed in order in f64 (the documented arithmetic).
fn mean(rows: &[&Vec<f32>]) -> Vec<f32> {
    assert!(!rows.is_empty(), "a mean over no rows");
    let mut sum = vec![0f64; rows[0].len()];
    for row in rows {
        for (s, v) in sum.iter_mut().zip(row.iter()) {
            *s += f64::from(*v);
        }
    }
    sum.iter().map(|s| (s / rows.len() as f64) as f32).collect()
}

/// Mean or last-token pooling of the rows `run` gives over `span`.
fn pool(run: Run<'_>, ids: &[u32], span: Range<usize>, pooling: Pooling) -> Vec<f32> {
    let rows = run(ids, span.clone());
    assert_eq!(rows.len(), span.len());
    if pooling == Pooling::LastToken {
        return rows[rows.len() - 1].clone();
    }
    mean(&rows.iter().collect::<Vec<_>>())
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

/// Whether `got` is within `tol` of `want`.
pub fn close(got: &[f32], want: &[f32], tol: Tolerance) -> bool {
    cosine(got, want) >= tol.min_cosine && max_abs_diff(got, want) <= tol.max_abs
}

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
