//! The model's card, `embedding.json` beside the model, written by
//! `models/prepare.py`: how this model embeds. Its native pooling (our probe
//! and mean through the learned head for base models; the hidden state of an
//! end token appended after the text, of the text's last token, or the mean
//! for embedding-tuned ones), its end token, whether its vectors are
//! L2-normalised, its Matryoshka widths, the templates of its input types
//! (an embedding model's instructions) and the probe.
//!
//! The card is required and checked at load: a model whose card is missing,
//! of another model or format, or names an end token its tokenizer does not
//! hold as one token, does not load. The server never guesses how a model
//! embeds.

use std::{collections::BTreeMap, path::Path};

use super::ModelError;

/// The card's file beside the model.
pub const CARD_FILE: &str = "embedding.json";
/// The card format this server reads.
pub const CARD_FORMAT: &str = "1";

/// A model's own way of making one vector of a text, as its card says.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NativePooling {
    /// A base (not embedding-tuned) model: the probe's and the mean's
    /// vectors through the learned head.
    ProbeMean,
    /// The hidden state of the card's end token appended after the text
    /// (Qwen3-Embedding's pooling).
    EndToken,
    /// The hidden state of the text's last token.
    LastToken,
    /// The mean of the text's hidden states.
    Mean,
}

impl NativePooling {
    /// Its name in the card.
    pub fn name(self) -> &'static str {
        match self {
            NativePooling::ProbeMean => "probe_mean",
            NativePooling::EndToken => "end_token",
            NativePooling::LastToken => "last_token",
            NativePooling::Mean => "mean",
        }
    }
}

/// A template around a turn's text: `prefix` + text + `suffix`, each part
/// tokenised on its own; only the text's tokens are pooled.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Template {
    /// Text before the turn's.
    pub prefix: String,
    /// Text after the turn's.
    pub suffix: String,
}

impl Template {
    fn parse(name: &str, template: &str) -> Result<Template, String> {
        let mut parts = template.split("{text}");
        match (parts.next(), parts.next(), parts.next()) {
            (Some(prefix), Some(suffix), None) => Ok(Template {
                prefix: prefix.to_string(),
                suffix: suffix.to_string(),
            }),
            _ => Err(format!(
                "input type {name:?}: the template must hold \"{{text}}\" exactly once"
            )),
        }
    }

    /// The template as written in the card.
    pub fn text(&self) -> String {
        format!("{}{{text}}{}", self.prefix, self.suffix)
    }
}

/// The card's templates: the input types and the probe.
#[derive(Debug, Clone)]
pub struct Templates {
    /// Input type name → template.
    pub input_types: BTreeMap<String, Template>,
    /// The probe's text (appended after a turn for
    /// [`crate::conversation::Pooling::Probe`]).
    pub probe: String,
}

/// A model's card, read and checked.
#[derive(Debug, Clone)]
pub struct Card {
    /// The pooling the model's vectors are made with unless a client asks
    /// for another.
    pub pooling: NativePooling,
    /// The token appended after the text by
    /// [`crate::conversation::Pooling::EndToken`] (e.g. `<|endoftext|>`).
    pub end_token: Option<String>,
    /// Whether the model's vectors are L2-normalised unless a client asks
    /// otherwise.
    pub normalize: bool,
    /// The widths the model's vector may be truncated to and keep its
    /// quality (Matryoshka), ascending; empty when none are stated.
    pub dimensions: Vec<usize>,
    /// Input types and the probe.
    pub templates: Templates,
    /// Where the card came from (e.g. "the GGUF's pooling_type and the card
    /// models/cards/qwen3-embedding.json").
    pub source: String,
}

impl Card {
    /// Reads and checks the card of the model named `name`.
    ///
    /// # Errors
    /// [`ModelError::Profile`] when the card is missing, malformed, of
    /// another format or model, or incomplete: no `query`/`document` input
    /// type, an empty probe, an END_TOKEN pooling without its end token,
    /// widths that are not ascending and positive.
    pub fn read(path: &Path, name: &str) -> Result<Card, ModelError> {
        let bad = |reason: String| ModelError::Profile {
            path: path.to_path_buf(),
            reason,
        };
        #[derive(serde::Deserialize)]
        #[serde(deny_unknown_fields)]
        struct File {
            format: String,
            model: String,
            #[serde(default)]
            source: String,
            pooling: NativePooling,
            #[serde(default)]
            end_token: Option<String>,
            normalize: bool,
            #[serde(default)]
            dimensions: Vec<usize>,
            input_types: BTreeMap<String, String>,
            probe: String,
        }
        let text = std::fs::read_to_string(path).map_err(|e| {
            bad(format!(
                "cannot read the model's card ({e}); run `make models` (or `models/prepare.py import` for an export of your own) to write it"
            ))
        })?;
        let file: File = serde_json::from_str(&text).map_err(|e| bad(format!("invalid card: {e}")))?;
        if file.format != CARD_FORMAT {
            return Err(bad(format!(
                "format {:?}, this server reads {CARD_FORMAT:?} (run `make models` to rewrite it)",
                file.format
            )));
        }
        if file.model != name {
            return Err(bad(format!(
                "the card of model {:?}, not of this model {name:?}",
                file.model
            )));
        }
        let mut input_types = BTreeMap::new();
        for (name, t) in &file.input_types {
            input_types.insert(name.clone(), Template::parse(name, t).map_err(bad)?);
        }
        for required in ["query", "document"] {
            if !input_types.contains_key(required) {
                return Err(bad(format!("no {required:?} input type")));
            }
        }
        if file.probe.is_empty() {
            return Err(bad("the probe is empty".to_string()));
        }
        if file.pooling == NativePooling::EndToken && file.end_token.as_deref().is_none_or(str::is_empty) {
            return Err(bad("pooling \"end_token\" needs the card's \"end_token\"".to_string()));
        }
        if file.dimensions.first() == Some(&0) || file.dimensions.windows(2).any(|w| w[0] >= w[1]) {
            return Err(bad(format!(
                "\"dimensions\" {:?} must be positive and ascending",
                file.dimensions
            )));
        }
        Ok(Card {
            pooling: file.pooling,
            end_token: file.end_token.filter(|t| !t.is_empty()),
            normalize: file.normalize,
            dimensions: file.dimensions,
            templates: Templates {
                input_types,
                probe: file.probe,
            },
            source: file.source,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn card(json: &str) -> Result<Card, String> {
        let mut f = tempfile::NamedTempFile::new().expect("a temporary file");
        std::io::Write::write_all(&mut f, json.as_bytes()).expect("written");
        Card::read(f.path(), "m").map_err(|e| e.to_string())
    }

    const TYPES: &str = r#""input_types":{"query":"Q: {text}","document":"{text}"},"probe":"P""#;

    #[test]
    fn reads_a_card() {
        let c = card(&format!(
            r#"{{"format":"1","model":"m","source":"s","pooling":"end_token","end_token":"<|endoftext|>","normalize":true,"dimensions":[32,64],{TYPES}}}"#
        ))
        .expect("a valid card");
        assert_eq!(c.pooling, NativePooling::EndToken);
        assert_eq!(c.end_token.as_deref(), Some("<|endoftext|>"));
        assert_eq!(c.dimensions, vec![32, 64]);
        assert_eq!(c.templates.input_types["query"].text(), "Q: {text}");
        assert_eq!(c.templates.probe, "P");
    }

    #[test]
    fn refuses_what_it_cannot_serve_exactly() {
        let base = |over: &str| {
            format!(r#"{{"format":"1","model":"m","pooling":"probe_mean","normalize":true,{over}{TYPES}}}"#)
        };
        assert!(card(&base("")).is_ok());
        let other = card(&base("").replace("\"m\"", "\"n\"")).unwrap_err();
        assert!(other.contains("not of this model"), "{other}");
        let format = card(&base("").replace("\"1\"", "\"0\"")).unwrap_err();
        assert!(format.contains("format"), "{format}");
        let end = card(&base("").replace("probe_mean", "end_token")).unwrap_err();
        assert!(end.contains("needs the card's \"end_token\""), "{end}");
        let pooling = card(&base("").replace("probe_mean", "cls")).unwrap_err();
        assert!(pooling.contains("invalid card"), "{pooling}");
        let dims = card(&base(r#""dimensions":[64,32],"#)).unwrap_err();
        assert!(dims.contains("ascending"), "{dims}");
        let unknown = card(&base(r#""pooling_type":3,"#)).unwrap_err();
        assert!(unknown.contains("unknown field"), "{unknown}");
        let no_query = card(&base("").replace("\"query\":\"Q: {text}\",", "")).unwrap_err();
        assert!(no_query.contains("no \"query\" input type"), "{no_query}");
        let missing = Card::read(Path::new("/nonexistent/e"), "m").unwrap_err().to_string();
        assert!(missing.contains("make models"), "{missing}");
    }

    #[test]
    fn templates_need_text_once() {
        assert_eq!(
            Template::parse("q", "Q: {text}!").unwrap(),
            Template {
                prefix: "Q: ".into(),
                suffix: "!".into()
            }
        );
        assert!(Template::parse("q", "no placeholder").is_err());
        assert!(Template::parse("q", "{text}{text}").is_err());
    }
}
