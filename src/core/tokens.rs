//! Placeholder until the BPE counter lands: the byte bound only.
use std::path::Path;
use std::sync::Arc;

pub const MESSAGE_FRAMING: u64 = 5;
pub const REPLY_PRIMER: u64 = 3;
pub const DEFAULT_SYSTEM: u64 = 21;

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("{0}")]
    Io(String),
}

pub struct Vocabulary;

impl Vocabulary {
    pub fn count(&self, text: &str) -> u64 {
        text.len() as u64
    }
}

pub fn cached_vocabulary(path: &Path) -> Result<Arc<Vocabulary>, TokenError> {
    Err(TokenError::Io(format!("{}", path.display())))
}

pub struct ChatMessage<'a> {
    pub role: &'a str,
    pub content: &'a str,
}

pub fn text_bound(vocab: Option<&Vocabulary>, text: &str) -> u64 {
    vocab.map_or(text.len() as u64, |v| v.count(text))
}

pub fn chat_bound(vocab: Option<&Vocabulary>, messages: &[ChatMessage<'_>]) -> u64 {
    let mut n = REPLY_PRIMER;
    if !messages.iter().any(|m| m.role == "system") {
        n += DEFAULT_SYSTEM;
    }
    for m in messages {
        n += MESSAGE_FRAMING + text_bound(vocab, m.content);
    }
    n
}
