//! Text to token ids, with the model's own `tokenizer.json`.
//!
//! There is no fallback: a model directory without a readable tokenizer.json
//! does not load, because a wrong token is a silently wrong embedding.

use std::path::{Path, PathBuf};

/// Why the tokenizer failed.
#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    /// tokenizer.json is missing or unreadable.
    #[error("cannot load the tokenizer {path}")]
    Load {
        /// The file.
        path: PathBuf,
        /// The tokenizers crate's error.
        #[source]
        source: tokenizers::Error,
    },
    /// A ChatML marker the model's vocabulary must hold is missing.
    #[error("the tokenizer {path} has no single token for {marker:?}: not a ChatML model")]
    MissingMarker {
        /// The file.
        path: PathBuf,
        /// The marker.
        marker: &'static str,
    },
    /// Encoding failed.
    #[error("tokenization failed")]
    Encode(#[source] tokenizers::Error),
}

/// The chat roles a turn may carry; anything else is refused.
pub const ROLES: [&str; 3] = ["system", "user", "assistant"];

/// A turn turned into tokens: `prefix ++ text ++ suffix`, where only `text`
/// is pooled into the embedding.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TurnTokens {
    /// All the tokens the turn adds to the context, in order.
    pub ids: Vec<u32>,
    /// The range of `ids` that holds the text's own tokens (the pooled span).
    pub text: std::ops::Range<usize>,
}

/// The model's tokenizer. Cheap to share (`&self` everywhere).
#[derive(Debug)]
pub struct TextTokenizer {
    inner: tokenizers::Tokenizer,
    im_end_suffix: Vec<u32>,
    /// The ids of the tokenizer's special tokens (its added tokens marked
    /// special: `<|im_start|>`, `<|im_end|>`, `<|endoftext|>`...), sorted.
    special: Vec<u32>,
}

impl TextTokenizer {
    /// Loads `tokenizer.json`.
    ///
    /// # Errors
    /// [`TokenizerError::Load`] when the file is missing or is not a tokenizer;
    /// [`TokenizerError::MissingMarker`] when `<|im_start|>`/`<|im_end|>` are not single tokens.
    pub fn from_file(path: &Path) -> Result<Self, TokenizerError> {
        let inner = tokenizers::Tokenizer::from_file(path).map_err(|source| TokenizerError::Load {
            path: path.to_path_buf(),
            source,
        })?;
        for marker in ["<|im_start|>", "<|im_end|>"] {
            if inner.token_to_id(marker).is_none() {
                return Err(TokenizerError::MissingMarker {
                    path: path.to_path_buf(),
                    marker,
                });
            }
        }
        let mut special: Vec<u32> = inner
            .get_added_tokens_decoder()
            .into_iter()
            .filter_map(|(id, token)| token.special.then_some(id))
            .collect();
        special.sort_unstable();
        let mut t = Self {
            inner,
            im_end_suffix: Vec::new(),
            special,
        };
        t.im_end_suffix = t.encode("<|im_end|>\n")?;
        Ok(t)
    }

    /// Token ids of `text`, with no special tokens added.
    ///
    /// # Errors
    /// [`TokenizerError::Encode`] if the tokenizer fails.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let enc = self.inner.encode_fast(text, false).map_err(TokenizerError::Encode)?;
        Ok(enc.get_ids().to_vec())
    }

    /// The tokens of one turn. An empty `role` means raw text; a role wraps the
    /// text in ChatML (`<|im_start|>{role}\n` … `<|im_end|>\n`), each part
    /// tokenised on its own so that the text's tokens do not depend on the role.
    /// The caller validates `role` (see [`ROLES`]).
    ///
    /// # Errors
    /// [`TokenizerError::Encode`] if the tokenizer fails.
    pub fn turn(&self, text: &str, role: &str) -> Result<TurnTokens, TokenizerError> {
        self.turn_templated(text, role, "", "")
    }

    /// [`TextTokenizer::turn`] with an input type's template around the text
    /// (inside the ChatML markers): `prefix`, the text and `suffix`, each
    /// tokenised on its own; only the text's tokens are in
    /// [`TurnTokens::text`].
    ///
    /// # Errors
    /// [`TokenizerError::Encode`] if the tokenizer fails.
    pub fn turn_templated(
        &self,
        text: &str,
        role: &str,
        prefix: &str,
        suffix: &str,
    ) -> Result<TurnTokens, TokenizerError> {
        let body = self.encode(text)?;
        let mut ids = if role.is_empty() {
            Vec::new()
        } else {
            self.encode(&format!("<|im_start|>{role}\n"))?
        };
        if !prefix.is_empty() {
            ids.extend(self.encode(prefix)?);
        }
        let start = ids.len();
        ids.extend_from_slice(&body);
        let end = ids.len();
        if !suffix.is_empty() {
            ids.extend(self.encode(suffix)?);
        }
        if !role.is_empty() {
            ids.extend_from_slice(&self.im_end_suffix);
        }
        Ok(TurnTokens { ids, text: start..end })
    }

    /// Text of token ids (special tokens kept).
    ///
    /// # Errors
    /// [`TokenizerError::Encode`] for ids outside the vocabulary.
    pub fn decode(&self, ids: &[u32]) -> Result<String, TokenizerError> {
        self.inner.decode(ids, false).map_err(TokenizerError::Encode)
    }

    /// The id of `token` when it is one token of the vocabulary (an added
    /// token such as `<|endoftext|>` included).
    pub fn token_id(&self, token: &str) -> Option<u32> {
        self.inner.token_to_id(token)
    }

    /// Whether `id` is one of the tokenizer's special tokens (ChatML's
    /// markers, the end of text...): what a mean over a conversation leaves out.
    pub fn is_special(&self, id: u32) -> bool {
        self.special.binary_search(&id).is_ok()
    }

    /// The vocabulary size, added tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }
}
