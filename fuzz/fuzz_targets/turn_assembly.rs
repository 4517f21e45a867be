//! Tokenizer and turn assembly over any bytes (the first byte picks the role,
//! the rest is text, prefix and suffix): never panics, and the text span
//! always lies inside the turn's ids.
#![no_main]

use std::{path::Path, sync::OnceLock};

use libfuzzer_sys::fuzz_target;
use stateful_embedder::model::TextTokenizer;

fn tokenizer() -> &'static TextTokenizer {
    static T: OnceLock<TextTokenizer> = OnceLock::new();
    T.get_or_init(|| {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../models/tiny/tokenizer.json");
        TextTokenizer::from_file(&path).expect("run `make tiny-model` first")
    })
}

fuzz_target!(|data: &[u8]| {
    let Some((&pick, rest)) = data.split_first() else { return };
    let Ok(text) = std::str::from_utf8(rest) else { return };
    let role = ["", "system", "user", "assistant", "robot"][pick as usize % 5];
    let (text, fix) = text.split_at(text.len() - text.chars().rev().take(4).map(char::len_utf8).sum::<usize>());
    let (prefix, suffix) = fix.split_at(fix.chars().take(2).map(char::len_utf8).sum::<usize>());
    if let Ok(turn) = tokenizer().turn_templated(text, role, prefix, suffix) {
        assert!(turn.text.start <= turn.text.end && turn.text.end <= turn.ids.len());
    }
});
