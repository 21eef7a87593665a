//! Tokenizers: the shipped byte-level BPE, or any Hugging Face `tokenizer.json`.

use std::path::Path;

use tokenizers::Tokenizer;

use super::error::{DataError, Result};

/// The default tokenizer: a byte-level BPE with 8192 tokens trained on the embedded corpus
/// by `cargo run -p bistro-train --example train_tokenizer`.
const EMBEDDED_TOKENIZER: &[u8] = include_bytes!("../../data/tokenizer.json");

/// End-of-text tokens looked up, in order, when a tokenizer does not name its EOS.
pub const EOS_CANDIDATES: [&str; 5] = ["<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>", "<|eot_id|>"];

/// A text tokenizer with a known end-of-sequence token.
#[derive(Clone)]
pub struct TextTokenizer {
    inner: Tokenizer,
    eos_id: u32,
    source_name: String,
}

impl std::fmt::Debug for TextTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextTokenizer")
            .field("source", &self.source_name)
            .field("vocab_size", &self.vocab_size())
            .field("eos_id", &self.eos_id)
            .finish()
    }
}

impl TextTokenizer {
    /// The shipped default tokenizer.
    pub fn embedded() -> Result<Self> {
        Self::from_bytes(EMBEDDED_TOKENIZER, "embedded")
    }

    /// `embedded`, or a path to a `tokenizer.json`.
    pub fn open(spec: &str) -> Result<Self> {
        if spec == "embedded" || spec.is_empty() { Self::embedded() } else { Self::from_file(Path::new(spec)) }
    }

    /// Load a Hugging Face `tokenizer.json`.
    pub fn from_file(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path).map_err(super::error::io_err(path))?;
        Self::from_bytes(&bytes, &path.display().to_string())
    }

    /// Parse a `tokenizer.json` held in memory; `name` is used in errors.
    pub fn from_bytes(bytes: &[u8], name: &str) -> Result<Self> {
        let inner = Tokenizer::from_bytes(bytes).map_err(|e| DataError::Tokenizer {
            source_name: name.to_string(),
            reason: format!("does not parse as a tokenizer.json: {e}"),
        })?;
        Self::new(inner, name)
    }

    /// Wrap a tokenizer, finding its EOS token among [`EOS_CANDIDATES`].
    pub fn new(inner: Tokenizer, name: &str) -> Result<Self> {
        let eos_id = EOS_CANDIDATES.iter().find_map(|t| inner.token_to_id(t)).ok_or_else(|| DataError::Tokenizer {
            source_name: name.to_string(),
            reason: format!("no end-of-text token (looked for {})", EOS_CANDIDATES.join(", ")),
        })?;
        Ok(TextTokenizer { inner, eos_id, source_name: name.to_string() })
    }

    /// Number of token ids, special tokens included.
    pub fn vocab_size(&self) -> usize {
        self.inner.get_vocab_size(true)
    }

    /// The end-of-sequence id appended after every document (also used as padding).
    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    /// Where this tokenizer came from (`embedded` or a path).
    pub fn source_name(&self) -> &str {
        &self.source_name
    }

    /// Token ids of `text`, without special tokens.
    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        self.inner
            .encode_fast(text, false)
            .map(|e| e.get_ids().to_vec())
            .map_err(|e| DataError::Tokenizer { source_name: self.source_name.clone(), reason: e.to_string() })
    }

    /// Text of token ids.
    pub fn decode(&self, ids: &[u32]) -> Result<String> {
        self.inner
            .decode(ids, false)
            .map_err(|e| DataError::Tokenizer { source_name: self.source_name.clone(), reason: e.to_string() })
    }

    /// The underlying `tokenizers` tokenizer.
    pub fn inner(&self) -> &Tokenizer {
        &self.inner
    }
}

/// Train a byte-level BPE tokenizer (GPT-2 style pre-tokenizer and decoder) with
/// `vocab_size` tokens, `<|endoftext|>` among them, on `docs`.
pub fn train_byte_level_bpe(docs: &[String], vocab_size: usize) -> Result<Tokenizer> {
    use tokenizers::models::bpe::{BPE, BpeTrainerBuilder};
    use tokenizers::pre_tokenizers::byte_level::ByteLevel;
    use tokenizers::{AddedToken, TokenizerBuilder};

    let err = |e: tokenizers::Error| DataError::Tokenizer { source_name: "training".into(), reason: e.to_string() };
    let mut trainer = BpeTrainerBuilder::new()
        .vocab_size(vocab_size)
        .min_frequency(2)
        .show_progress(false)
        .initial_alphabet(ByteLevel::alphabet().into_iter().collect())
        .special_tokens(vec![AddedToken::from("<|endoftext|>", true)])
        .build();
    let mut tok = TokenizerBuilder::<BPE, _, _, _, _>::new()
        .with_model(BPE::default())
        .with_normalizer(None::<tokenizers::normalizers::NormalizerWrapper>)
        .with_pre_tokenizer(Some(ByteLevel::new(false, true, true)))
        .with_post_processor(Some(ByteLevel::new(false, true, true)))
        .with_decoder(Some(ByteLevel::new(false, true, true)))
        .build()
        .map_err(err)?;
    tok.train(&mut trainer, docs.iter()).map_err(err)?;
    Ok(tok.into())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_tokenizer_round_trips() {
        let t = TextTokenizer::embedded().unwrap();
        assert_eq!(t.vocab_size(), 8192);
        let s = "The hacker's {kluge} ran on a PDP-10 — façade, naïve, 日本.";
        let ids = t.encode(s).unwrap();
        assert!(!ids.is_empty());
        assert_eq!(t.decode(&ids).unwrap(), s);
        assert!(ids.iter().all(|&i| (i as usize) < t.vocab_size()));
    }

    #[test]
    fn garbage_tokenizer_is_a_clear_error() {
        let e = TextTokenizer::from_bytes(b"{not json", "bad.json").unwrap_err().to_string();
        assert!(e.contains("bad.json") && e.contains("does not parse"), "{e}");
        let e = TextTokenizer::from_file(Path::new("/nonexistent/tokenizer.json")).unwrap_err().to_string();
        assert!(e.contains("/nonexistent/tokenizer.json"), "{e}");
    }

    #[test]
    fn training_a_small_tokenizer_works() {
        let docs: Vec<String> = (0..200).map(|i| format!("document number {i} about hackers and kludges")).collect();
        let tok = train_byte_level_bpe(&docs, 300).unwrap();
        let t = TextTokenizer::new(tok, "trained").unwrap();
        let ids = t.encode("hackers and kludges").unwrap();
        assert_eq!(t.decode(&ids).unwrap(), "hackers and kludges");
    }
}
