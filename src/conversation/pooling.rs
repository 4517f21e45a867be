//! From a turn's hidden states to its vector: the rows pooled as they come
//! out of the turn's calls ([`Pooler`]: the mean and the last of the text's
//! rows, the last row of the probe or the end token, and for
//! [`MeanOver::Conversation`] the conversation's running sum), then standardised
//! with the model's background statistics or its learned head, truncated
//! and normalised ([`vectors`]).

use std::ops::Range;

use super::options::{ConversationOptions, MeanOver, Pooling, Standardize};
use crate::model::{Hidden, Model, unit};

/// A sum of hidden rows, added one after another in f64 in the sequence's
/// order, and how many there are: a turn's text mean, and
/// [`MeanOver::Conversation`]'s running sum over the context's tokens that
/// are not special tokens (carried across turns, it is bit for bit the sum
/// over the whole context in one pass).
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct RowSum {
    sum: Vec<f64>,
    rows: usize,
}

impl RowSum {
    /// The sum of no rows.
    pub(crate) fn empty(width: usize) -> Self {
        Self {
            sum: vec![0.0; width],
            rows: 0,
        }
    }

    fn add(&mut self, row: &[f32]) {
        for (s, v) in self.sum.iter_mut().zip(row) {
            *s += f64::from(*v);
        }
        self.rows += 1;
    }

    fn mean(&self) -> Vec<f32> {
        let n = self.rows.max(1) as f64;
        self.sum.iter().map(|s| (s / n) as f32).collect()
    }
}

/// The rows of a turn's sequence that join the conversation's sum.
#[derive(Debug)]
struct ContextRows {
    /// Per row of the sequence from its first, whether it is summed (not a
    /// special token, nor a row the sum already holds); rows past its end
    /// (the probe's) are not.
    plain: Vec<bool>,
    /// The first row summed: the rows before it are in the sum already
    /// (a rebuilt context whose sum the conversation kept).
    first: usize,
    /// The sum so far: the one the turn goes on from, then the rows taken.
    sum: RowSum,
}

/// Pools a turn's rows as they stream out of its calls: the mean and the
/// last of its text rows, the last row of what rides after them (the
/// probe or the end token), and with [`MeanOver::Conversation`] every
/// plain row of the sequence into the conversation's sum.
#[derive(Debug)]
pub(crate) struct Pooler {
    /// Rows of the turn's sequence that are the turn's text.
    text: Range<usize>,
    /// The row of the last token riding after the text (the probe's or the
    /// end token), when the pooling appends one.
    probe_row: Option<usize>,
    sum: RowSum,
    last: Vec<f32>,
    probe: Option<Vec<f32>>,
    context: Option<ContextRows>,
}

impl Pooler {
    /// A pooler of hidden states `width` wide, over the text rows `text` of
    /// the turn's sequence and, if any, the probe's row `probe_row`.
    pub(crate) fn new(width: usize, text: Range<usize>, probe_row: Option<usize>) -> Self {
        Self {
            text,
            probe_row,
            sum: RowSum::empty(width),
            last: Vec::new(),
            probe: None,
            context: None,
        }
    }

    /// Also sums the rows of the sequence's first `plain.len()` tokens whose
    /// `plain` is true, from row `first` on, onto `sum` (the conversation's
    /// sum over the context before row `first`), for
    /// [`MeanOver::Conversation`].
    pub(crate) fn with_context(mut self, sum: RowSum, mut plain: Vec<bool>, first: usize) -> Self {
        let first = first.min(plain.len());
        plain[..first].fill(false);
        self.context = Some(ContextRows { plain, first, sum });
        self
    }

    /// The rows of the sequence whose hidden states the pooler reads: the
    /// text's, and on to the probe's last row (every row but the probe's
    /// when it sums the context).
    pub(crate) fn rows(&self) -> Range<usize> {
        let end = self.probe_row.map_or(self.text.end, |r| r + 1);
        match &self.context {
            Some(c) => c.first.min(self.text.start)..end.max(c.plain.len()),
            None => self.text.start..end,
        }
    }

    /// The conversation's sum after the turn's rows, if it keeps one.
    pub(crate) fn context_sum(&self) -> Option<&RowSum> {
        self.context.as_ref().map(|c| &c.sum)
    }

    /// Takes the rows of `hidden`, the first of which is row `first` of the
    /// turn's sequence.
    pub(crate) fn add_rows(&mut self, hidden: &Hidden, first: usize) {
        for r in 0..hidden.rows() {
            let (index, row) = (first + r, hidden.row(r));
            if self.text.contains(&index) {
                self.sum.add(row);
                self.last.clear();
                self.last.extend_from_slice(row);
            }
            if self.probe_row == Some(index) {
                self.probe = Some(row.to_vec());
            }
            if let Some(c) = &mut self.context
                && c.plain.get(index).copied().unwrap_or(false)
            {
                c.sum.add(row);
            }
        }
    }

    fn mean(&self) -> Vec<f32> {
        self.sum.mean()
    }

    /// The mean the options pool: the turn's text, or the conversation's.
    fn pooled_mean(&self, over: MeanOver) -> Vec<f32> {
        match (over, &self.context) {
            (MeanOver::Conversation, Some(c)) => c.sum.mean(),
            _ => self.mean(),
        }
    }
}

/// The pooled vectors of one turn, before standardisation.
#[derive(Debug, Clone, PartialEq)]
enum Pooled {
    /// One vector, with the name of its background statistics.
    One(&'static str, Vec<f32>),
    /// [`Pooling::ProbeMean`]'s two.
    ProbeMean { probe: Vec<f32>, mean: Vec<f32> },
}

/// A turn's embedding, and its mean beside it when the options ask, from
/// everything `pooler` took.
pub(crate) fn vectors(model: &Model, options: &ConversationOptions, pooler: Pooler) -> (Vec<f32>, Option<Vec<f32>>) {
    let Pooler { last, probe, .. } = &pooler;
    let turn_mean = options.include_turn_mean.then(|| {
        postprocess(
            model,
            options,
            Pooled::One("mean", pooler.mean()),
            options.turn_mean_dimensions(model),
        )
    });
    let probe = || {
        probe
            .clone()
            .expect("a pooling that appends has its last row in the turn's call")
    };
    let pooled = match options.pooling {
        // The conversation's mean is standardised with the turn mean's statistics.
        Pooling::Mean => Pooled::One("mean", pooler.pooled_mean(options.mean_over)),
        Pooling::LastToken => Pooled::One("last_token", last.clone()),
        Pooling::Probe => Pooled::One("probe", probe()),
        // The end token's row: the model's own vector (validated: raw).
        Pooling::EndToken => Pooled::One("end_token", probe()),
        Pooling::ProbeMean => Pooled::ProbeMean {
            mean: pooler.pooled_mean(options.mean_over),
            probe: probe(),
        },
    };
    let embedding = postprocess(model, options, pooled, options.output_dimensions(model));
    (embedding, turn_mean)
}

/// Standardises one pooled vector with the statistics named `key`,
/// keeping `dims` components. (The head has no single-vector form: a lone
/// vector under [`Standardize::Head`], `include_turn_mean`'s, is z-scored.)
fn standardized(model: &Model, options: &ConversationOptions, key: &str, mut v: Vec<f32>, dims: usize) -> Vec<f32> {
    let stats = || model.embedding_stats().get(key);
    match options.standardize {
        Standardize::None => {}
        Standardize::Zscore | Standardize::Head => stats().apply(&mut v),
        Standardize::Whiten => v = stats().whiten(&v, dims),
    }
    v.truncate(dims);
    v
}

/// Standardises (as the options say), truncates to `dims` and normalises a
/// turn's pooled vectors.
fn postprocess(model: &Model, options: &ConversationOptions, pooled: Pooled, dims: usize) -> Vec<f32> {
    let v = match pooled {
        Pooled::One(key, v) => standardized(model, options, key, v, dims),
        Pooled::ProbeMean { probe, mean } if options.standardize == Standardize::Head => model
            .embedding_head()
            .expect("validated: STANDARDIZE_HEAD only on a model with a head")
            .apply(&probe, &mean),
        Pooled::ProbeMean { probe, mean } => {
            // Each part takes half the dimensions (the probe the odd one),
            // each normalised: side by side, neither outweighs the other.
            let mut v = unit(standardized(model, options, "probe", probe, dims.div_ceil(2)));
            v.extend(unit(standardized(model, options, "mean", mean, dims / 2)));
            v
        }
    };
    truncate_and_normalize(v, dims, options.normalize)
}

/// Truncates to `dims` and L2-normalises if asked.
pub fn truncate_and_normalize(mut v: Vec<f32>, dims: usize, normalize: bool) -> Vec<f32> {
    v.truncate(dims);
    if normalize {
        let norm = v.iter().map(|x| f64::from(*x) * f64::from(*x)).sum::<f64>().sqrt();
        if norm > 0.0 {
            for x in &mut v {
                *x = (f64::from(*x) / norm) as f32;
            }
        }
    }
    v
}
