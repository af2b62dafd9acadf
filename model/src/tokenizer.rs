use crate::{ModelError, Result};
use std::collections::HashMap;
use tiktoken_rs::CoreBPE;

/// GPT-2's byte-pair encoding has 50257 tokens (tiktoken's `r50k_base`, ranks embedded).
pub const GPT2_VOCAB: usize = 50257;

pub enum Tokenizer {
    /// One token per Unicode scalar value; the vocabulary is the sorted set seen in the corpus.
    Char {
        vocab: Vec<char>,
        index: HashMap<char, u32>,
    },
    Gpt2(&'static CoreBPE),
}

impl Tokenizer {
    pub fn char_from_vocab(vocab: Vec<char>) -> Self {
        let index = vocab
            .iter()
            .enumerate()
            .map(|(i, c)| (*c, i as u32))
            .collect();
        Tokenizer::Char { vocab, index }
    }

    /// The character vocabulary of a set of texts: sorted, deduplicated.
    pub fn char_from_texts<'a>(texts: impl IntoIterator<Item = &'a str>) -> Self {
        let mut set = std::collections::BTreeSet::new();
        for t in texts {
            set.extend(t.chars());
        }
        Self::char_from_vocab(set.into_iter().collect())
    }

    pub fn gpt2() -> Self {
        Tokenizer::Gpt2(tiktoken_rs::r50k_base_singleton())
    }

    /// Rebuilds the tokenizer that `meta.json` describes.
    pub fn from_meta(kind: &str, vocab: Option<&str>) -> Result<Self> {
        match (kind, vocab) {
            ("char", Some(v)) => Ok(Self::char_from_vocab(v.chars().collect())),
            ("char", None) => Err(ModelError::Tokenizer(
                "a char tokenizer needs its vocabulary (meta.json field `vocab`)".into(),
            )),
            ("gpt2", _) => Ok(Self::gpt2()),
            (other, _) => Err(ModelError::Tokenizer(format!(
                "unknown tokenizer {other:?}; use \"char\" or \"gpt2\""
            ))),
        }
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Tokenizer::Char { .. } => "char",
            Tokenizer::Gpt2(_) => "gpt2",
        }
    }

    pub fn vocab_size(&self) -> usize {
        match self {
            Tokenizer::Char { vocab, .. } => vocab.len(),
            Tokenizer::Gpt2(_) => GPT2_VOCAB,
        }
    }

    /// The character vocabulary as one string (what `meta.json` stores), if any.
    pub fn vocab_string(&self) -> Option<String> {
        match self {
            Tokenizer::Char { vocab, .. } => Some(vocab.iter().collect()),
            Tokenizer::Gpt2(_) => None,
        }
    }

    pub fn encode(&self, text: &str) -> Result<Vec<u32>> {
        match self {
            Tokenizer::Char { index, .. } => text
                .chars()
                .map(|c| {
                    index
                        .get(&c)
                        .copied()
                        .ok_or(ModelError::UnknownChar { ch: c })
                })
                .collect(),
            Tokenizer::Gpt2(bpe) => Ok(bpe.encode_ordinary(text)),
        }
    }

    pub fn decode(&self, tokens: &[u32]) -> Result<String> {
        match self {
            Tokenizer::Char { vocab, .. } => tokens
                .iter()
                .map(|&t| {
                    vocab
                        .get(t as usize)
                        .copied()
                        .ok_or(ModelError::TokenOutOfRange {
                            token: t,
                            vocab_size: vocab.len(),
                        })
                })
                .collect(),
            Tokenizer::Gpt2(bpe) => bpe
                .decode(tokens)
                .map_err(|e| ModelError::Tokenizer(e.to_string())),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn char_round_trip_and_unknown_char() {
        let t = Tokenizer::char_from_texts(["ROMEO:\nBut soft!"]);
        let ids = t.encode("soft ROME").unwrap();
        assert_eq!(t.decode(&ids).unwrap(), "soft ROME");
        assert!(matches!(
            t.encode("xyz"),
            Err(ModelError::UnknownChar { ch: 'x' })
        ));
    }

    #[test]
    fn gpt2_round_trip() {
        let t = Tokenizer::gpt2();
        let text = "To be, or not to be: that is the question.\n";
        let ids = t.encode(text).unwrap();
        assert!(ids.len() < text.len() / 2);
        assert!(ids.iter().all(|&i| (i as usize) < GPT2_VOCAB));
        assert_eq!(t.decode(&ids).unwrap(), text);
    }
}
