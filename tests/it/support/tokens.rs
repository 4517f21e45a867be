//! Expected token ids, made without the server's tokenizer code: the
//! model's `tokenizer.json` read straight through the `tokenizers` crate,
//! and the ChatML markers and roles as literal ids of Qwen's vocabulary
//! (tests/python/test_model.py checks those ids against the tokenizer too).
//! The server's `TextTokenizer` (its settings and its turn assembly) is what
//! these check, so they never call it.

use std::{
    collections::HashMap,
    ops::Range,
    path::{Path, PathBuf},
    sync::{Mutex, OnceLock},
};

use super::models;

/// `<|im_start|>`.
pub const IM_START: u32 = 151_644;
/// `<|im_end|>`.
pub const IM_END: u32 = 151_645;
/// `\n`.
pub const NEWLINE: u32 = 198;

/// A role's single token.
pub fn role_id(role: &str) -> u32 {
    match role {
        "system" => 8948,
        "user" => 872,
        "assistant" => 77_091,
        other => panic!("no literal id for role {other:?}"),
    }
}

/// The reference tokenizer of the model in `dir` (loaded once per directory).
fn reference(dir: &Path) -> &'static tokenizers::Tokenizer {
    static LOADED: OnceLock<Mutex<HashMap<PathBuf, &'static tokenizers::Tokenizer>>> = OnceLock::new();
    let mut loaded = LOADED.get_or_init(Default::default).lock().unwrap();
    loaded.entry(dir.to_path_buf()).or_insert_with(|| {
        let file = dir.join("tokenizer.json");
        Box::leak(Box::new(
            tokenizers::Tokenizer::from_file(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display())),
        ))
    })
}

/// The token ids of `text` alone (no special tokens added), by the tiny
/// model's tokenizer.json.
pub fn encode(text: &str) -> Vec<u32> {
    encode_in(&models::tiny_dir(), text)
}

/// [`encode`] by the tokenizer.json of the model in `dir`.
pub fn encode_in(dir: &Path, text: &str) -> Vec<u32> {
    reference(dir)
        .encode(text, false)
        .unwrap_or_else(|e| panic!("encoding {text:?}: {e}"))
        .get_ids()
        .to_vec()
}

/// The id of `token` as one token of the tokenizer.json in `dir` (an added
/// token such as `<|endoftext|>`).
pub fn token_id_in(dir: &Path, token: &str) -> u32 {
    reference(dir)
        .token_to_id(token)
        .unwrap_or_else(|| panic!("{token:?} is not one token"))
}

/// A turn as the protocol documents it: raw text as it is; with a role,
/// `<|im_start|>{role}\n{text}<|im_end|>\n`. Returns the ids and the span of
/// the text's own tokens (what is pooled).
pub fn turn(text: &str, role: &str) -> (Vec<u32>, Range<usize>) {
    turn_in(&models::tiny_dir(), text, role)
}

/// [`turn`] by the tokenizer.json of the model in `dir`.
pub fn turn_in(dir: &Path, text: &str, role: &str) -> (Vec<u32>, Range<usize>) {
    let body = encode_in(dir, text);
    if role.is_empty() {
        let n = body.len();
        return (body, 0..n);
    }
    let mut ids = vec![IM_START, role_id(role), NEWLINE];
    let start = ids.len();
    ids.extend_from_slice(&body);
    let end = ids.len();
    ids.extend_from_slice(&[IM_END, NEWLINE]);
    (ids, start..end)
}

/// A conversation's expected context, turn by turn.
#[derive(Debug, Default, Clone)]
pub struct Context {
    /// Every token so far.
    pub ids: Vec<u32>,
}

impl Context {
    /// Appends a turn; returns the span of its text in the whole context.
    pub fn push(&mut self, text: &str, role: &str) -> Range<usize> {
        let (ids, span) = turn(text, role);
        let at = self.ids.len();
        self.ids.extend_from_slice(&ids);
        at + span.start..at + span.end
    }
}
