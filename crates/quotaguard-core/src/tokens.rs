//! The input-token bound of a request (R8, docs/rules.md).
//!
//! A call may only go out if its worst case fits in the free quota, so the
//! input side must never be under what the service bills. With the Qwen
//! vocabulary (`dashscope/resources/qwen.tiktoken`) contents are counted with
//! the same byte-level BPE as tiktoken, after the same pre-tokenizer
//! (dashscope's `PAT_STR`); without it, the UTF-8 length is the bound, since
//! every BPE token covers at least one byte. The chat framing of R8 is added
//! on top in both cases.
//!
//! Pure Rust: no Python types, no global lock held while counting.

use std::borrow::Cow;
use std::cell::RefCell;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};

use base64::Engine as _;
use hashbrown::hash_table::{Entry, HashTable};
use regex_syntax::hir::{Class, HirKind};
use rustc_hash::FxHashMap;
use unicode_normalization::{is_nfc_quick, IsNormalized, UnicodeNormalization};

/// Tokens of chat framing billed per message: `<|im_start|>`, the role, a
/// newline, `<|im_end|>`, a newline.
pub const MESSAGE_FRAMING: u64 = 5;
/// Tokens that open the reply: `<|im_start|>assistant\n`.
pub const REPLY_PRIMER: u64 = 3;
/// Upper bound of the default system message the service adds when a request
/// has none (Qwen2.5's template).
pub const DEFAULT_SYSTEM: u64 = 21;

/// dashscope's tokenizer encodes texts longer than this many code points in
/// chunks split at newlines (`QwenTokenizer._CHUNK_SIZE`).
const DASHSCOPE_CHUNK_CHARS: usize = 100_000;

/// Rank of a byte string absent from the vocabulary (tiktoken's `Rank::MAX`).
const NO_RANK: u32 = u32::MAX;

/// Pieces up to this many bytes merge with tiktoken's own quadratic loop on a
/// stack array; longer ones (long runs of CJK letters) with a heap.
const SMALL_PIECE: usize = 16;

/// Why a vocabulary could not be loaded.
#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("cannot read Qwen vocabulary \"{}\": {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("malformed Qwen vocabulary{}, line {line}: {reason}", in_file(.path.as_deref()))]
    Malformed {
        path: Option<PathBuf>,
        line: usize,
        reason: String,
    },
    #[error("Qwen vocabulary{} holds no tokens", in_file(.path.as_deref()))]
    Empty { path: Option<PathBuf> },
}

fn in_file(path: Option<&Path>) -> String {
    path.map(|p| format!(" \"{}\"", p.display()))
        .unwrap_or_default()
}

impl TokenError {
    fn with_path(self, file: &Path) -> Self {
        match self {
            TokenError::Malformed { line, reason, .. } => TokenError::Malformed {
                path: Some(file.to_path_buf()),
                line,
                reason,
            },
            TokenError::Empty { .. } => TokenError::Empty {
                path: Some(file.to_path_buf()),
            },
            other => other,
        }
    }
}

/// A tiktoken BPE vocabulary (`base64token rank` per line).
///
/// Compact so that it loads in a few milliseconds, in hashbrown's raw tables found by
/// `key_hash`: a token of up to 11 bytes is one 16-byte slot of `short` (its bytes,
/// its length, its rank: no second read to check it); one of 12 to 15 bytes sits in
/// `arena`, and `mid` holds `rank << 32 | start << 4 | len` for it.
pub struct Vocabulary {
    /// `inline_key(pack(token)) | rank << 96` per token of up to `INLINE_MAX` bytes.
    short: HashTable<u128>,
    mid: HashTable<u64>,
    /// The bytes of the tokens in `mid`, then 16 zero bytes (a 16-byte load at any
    /// token's start stays inside).
    arena: Box<[u8]>,
    /// Longer tokens.
    long: FxHashMap<Vec<u8>, u32>,
    /// Ranks of every two-byte string, indexed by `first << 8 | second`: the
    /// first round of merges then needs no hashing.
    pair_ranks: Box<[u32]>,
    max_token_len: usize,
    /// Per code point below U+10000, when its bytes alone merge into one token: the
    /// highest rank among those merges (0 for a one-byte character); else `NO_RANK`.
    /// Lets `merge_chars` start from characters instead of bytes.
    char_done: Box<[u32]>,
    /// For the tokens that are not valid UTF-8 and hold a character start after their
    /// first byte (so that they join part of one character to another), per byte pair
    /// ending at such a start (`last << 8 | first`): the lowest of their ranks.
    cross_min: FxHashMap<u16, u32>,
    /// A bit per byte pair in `cross_min` (a hundred or so): most boundaries need no
    /// lookup there.
    cross_bits: Box<[u64]>,
    /// A bit per hash of two non-ASCII characters (`pair_bit`) set when some token
    /// holds them next to each other: most pairs of whole characters need no lookup.
    char_pairs: Box<[u64]>,
    /// Tells this vocabulary from any other loaded in the process (the per-thread
    /// piece cache holds counts of one vocabulary at a time).
    id: u64,
}

impl fmt::Debug for Vocabulary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Vocabulary")
            .field("len", &self.len())
            .field("max_token_len", &self.max_token_len)
            .finish()
    }
}

/// A value quoted for an error message, cut short if long.
fn shown(bytes: &[u8]) -> String {
    let text = String::from_utf8_lossy(bytes);
    let mut out: String = text.chars().take(40).collect();
    if out.len() < text.len() {
        out.push('…');
    }
    format!("{out:?}")
}

impl Vocabulary {
    /// Parses a tiktoken BPE file's contents, as dashscope's
    /// `QwenTokenizer._load_tiktoken_bpe` does (blank lines are skipped). A
    /// token or a rank given twice is an error, as tiktoken makes it; every
    /// error names the line.
    pub fn from_tiktoken_bytes(data: &[u8]) -> Result<Self, TokenError> {
        let malformed = |line: usize, reason: String| TokenError::Malformed {
            path: None,
            line,
            reason,
        };
        let lines_in_file = data.iter().filter(|&&b| b == b'\n').count() + 1;
        let mut short: HashTable<u128> = HashTable::with_capacity(lines_in_file);
        let mut mid: HashTable<u64> = HashTable::new();
        // Every token's base64 in `data` is longer than its bytes: they fit, with 16
        // bytes to spare for reading any token's start as one u128.
        let mut arena: Vec<u8> = Vec::new();
        let mut arena_end = 0;
        let mut long: FxHashMap<Vec<u8>, u32> = FxHashMap::default();
        // Ranks come in increasing order in tiktoken files, which rules out a rank given
        // twice at no cost; `by_rank` (rank -> line) is only built if one comes out of
        // order, to reject a rank given twice as tiktoken does.
        let mut last_rank: Option<u32> = None;
        let mut by_rank: Option<FxHashMap<u32, usize>> = None;
        let mut tokens = 0usize;
        let mut pair_ranks = vec![NO_RANK; 1 << 16].into_boxed_slice();
        let mut max_token_len = 0;
        let mut buf = [0u8; 96];
        let mut small: [u8; 16];
        let mut owned: Vec<u8>;
        for (index, raw) in data.split(|&b| b == b'\n').enumerate() {
            let line_no = index + 1;
            // Lines as tiktoken writes them ("<base64> <digits>") take the fast path;
            // any other goes through the general one, which also words the errors.
            // `word`: a short token from the fast path, packed in a register.
            let (token, rank, word): (&[u8], u32, Option<u128>) = match fast_line(raw, &mut buf) {
                Some((len, rank, word)) if len <= PACKED_MAX => {
                    small = word.to_le_bytes();
                    (&small[..len], rank, Some(word))
                }
                Some((len, rank, _)) => (&buf[..len], rank, None),
                None => {
                    let line = raw.strip_suffix(b"\r").unwrap_or(raw);
                    let mut fields = line
                        .split(|b| b.is_ascii_whitespace())
                        .filter(|f| !f.is_empty());
                    let Some(token_b64) = fields.next() else {
                        continue;
                    };
                    let (Some(rank_text), None) = (fields.next(), fields.next()) else {
                        return Err(malformed(
                            line_no,
                            format!("expected \"<base64 token> <rank>\", got {}", shown(line)),
                        ));
                    };
                    owned = base64::engine::general_purpose::STANDARD
                        .decode(token_b64)
                        .map_err(|e| {
                            malformed(
                                line_no,
                                format!("bad base64 token {}: {e}", shown(token_b64)),
                            )
                        })?;
                    let rank = parse_rank(rank_text).ok_or_else(|| {
                        malformed(line_no, format!("bad rank {}", shown(rank_text)))
                    })?;
                    (&owned[..], rank, None)
                }
            };
            if token.is_empty() {
                return Err(malformed(line_no, "empty token".to_owned()));
            }
            if by_rank.is_none() && last_rank.is_some_and(|last| rank <= last) {
                by_rank = Some(rank_lines(data, index));
            }
            if let Some(map) = by_rank.as_mut() {
                if let Some(first) = map.insert(rank, line_no) {
                    return Err(malformed(
                        line_no,
                        format!("rank {rank} already given on line {first}"),
                    ));
                }
            }
            last_rank = Some(rank);
            tokens += 1;
            max_token_len = max_token_len.max(token.len());
            if let [a, b] = token[..] {
                pair_ranks[usize::from(a) << 8 | usize::from(b)] = rank;
            }
            if token.len() <= PACKED_MAX && arena_end >= 1 << 28 {
                return Err(malformed(
                    line_no,
                    "too many tokens (over 256 MB)".to_owned(),
                ));
            }
            let key = match word {
                Some(word) if token.len() <= PACKED_MAX => word | (token.len() as u128) << 120,
                _ if token.len() <= PACKED_MAX => pack(token),
                _ => 0,
            };
            let previous = if token.len() <= INLINE_MAX {
                let inline = inline_key(key);
                match short.entry(
                    key_hash(inline),
                    |&e| e & INLINE_KEY == inline,
                    |&e| key_hash(e & INLINE_KEY),
                ) {
                    Entry::Occupied(found) => Some((*found.get() >> 96) as u32),
                    Entry::Vacant(slot) => {
                        slot.insert(inline | u128::from(rank) << 96);
                        None
                    }
                }
            } else if token.len() <= PACKED_MAX {
                if arena.len() < arena_end + 16 {
                    arena.resize((arena_end + 16) * 2, 0);
                }
                let entry = u64::from(rank) << 32 | (arena_end as u64) << 4 | token.len() as u64;
                match mid.entry(
                    key_hash(key),
                    |&e| entry_key(&arena, e) == key,
                    |&e| key_hash(entry_key(&arena, e)),
                ) {
                    Entry::Occupied(found) => Some((*found.get() >> 32) as u32),
                    Entry::Vacant(slot) => {
                        slot.insert(entry);
                        // Sixteen bytes at once: what lies past the token is masked
                        // off (`entry_key`) or overwritten by the next one.
                        arena[arena_end..arena_end + 16].copy_from_slice(&key.to_le_bytes());
                        arena_end += token.len();
                        None
                    }
                }
            } else {
                long.insert(token.to_vec(), rank)
            };
            if let Some(previous) = previous {
                return Err(malformed(
                    line_no,
                    format!(
                        "duplicate token {} (ranks {previous} and {rank})",
                        shown(
                            base64::engine::general_purpose::STANDARD
                                .encode(token)
                                .as_bytes()
                        )
                    ),
                ));
            }
        }
        if tokens == 0 {
            return Err(TokenError::Empty { path: None });
        }
        arena.resize(arena_end + 16, 0);
        arena[arena_end..].fill(0);
        let mut vocab = Vocabulary {
            short,
            mid,
            arena: arena.into_boxed_slice(),
            long,
            pair_ranks,
            max_token_len,
            char_done: Box::default(),
            cross_min: FxHashMap::default(),
            cross_bits: Box::default(),
            char_pairs: Box::default(),
            id: NEXT_ID.fetch_add(1, Ordering::Relaxed),
        };
        vocab.index_characters();
        Ok(vocab)
    }

    /// Fills `char_done` and `cross_min` from the tokens.
    fn index_characters(&mut self) {
        let mut char_done = vec![NO_RANK; 0x1_0000].into_boxed_slice();
        for b in 0..0x80u8 {
            if self.rank(&[b]) != NO_RANK {
                char_done[usize::from(b)] = 0;
            }
        }
        let mut cross_min: FxHashMap<u16, u32> = FxHashMap::default();
        let mut char_pairs = vec![0u64; CHAR_PAIR_BITS / 64].into_boxed_slice();
        let mut visit = |token: &[u8], rank: u32| match std::str::from_utf8(token) {
            Ok(text) => {
                let mut chars = text.chars();
                if !text.is_ascii() {
                    let mut last = None;
                    for c in text.chars() {
                        if let Some(b) = last {
                            if let Some(bit) = pair_bit(b, c) {
                                char_pairs[bit / 64] |= 1 << (bit % 64);
                            }
                        }
                        last = Some(c);
                    }
                }
                if let (Some(c), None) = (chars.next(), chars.next()) {
                    let code = c as usize;
                    let first = match *token {
                        [a, b] => Some(self_pair(&self.pair_ranks, a, b)),
                        [a, b, c] => {
                            let first = self_pair(&self.pair_ranks, a, b).min(self_pair(
                                &self.pair_ranks,
                                b,
                                c,
                            ));
                            (first != NO_RANK).then_some(first.max(rank))
                        }
                        _ => None,
                    };
                    if let Some(m) = first.filter(|&m| m != NO_RANK) {
                        if code < char_done.len() {
                            char_done[code] = m;
                        }
                    }
                }
            }
            Err(_) => {
                for k in 1..token.len() {
                    if token[k] & 0xC0 != 0x80 {
                        let pair = u16::from(token[k - 1]) << 8 | u16::from(token[k]);
                        let min = cross_min.entry(pair).or_insert(rank);
                        *min = (*min).min(rank);
                    }
                }
            }
        };
        for &entry in self.short.iter() {
            let len = (entry >> 88) as usize & 0xF;
            visit(&entry.to_le_bytes()[..len], (entry >> 96) as u32);
        }
        for &entry in self.mid.iter() {
            let start = (entry as u32 >> 4) as usize;
            let len = (entry & 0xF) as usize;
            visit(&self.arena[start..start + len], (entry >> 32) as u32);
        }
        for (token, &rank) in &self.long {
            visit(token, rank);
        }
        self.char_done = char_done;
        let mut cross_bits = vec![0u64; 1 << 10].into_boxed_slice();
        for &pair in cross_min.keys() {
            cross_bits[usize::from(pair) / 64] |= 1 << (pair % 64);
        }
        self.cross_min = cross_min;
        self.cross_bits = cross_bits;
        self.char_pairs = char_pairs;
    }

    /// False when `piece` cannot be a token: it holds two non-ASCII characters next
    /// to each other that no token does (`may_pair`).
    fn may_be_token(&self, piece: &[u8]) -> bool {
        let Ok(text) = std::str::from_utf8(piece) else {
            return true;
        };
        let mut chars = text.chars();
        let Some(mut last) = chars.next() else {
            return true;
        };
        chars.all(|c| {
            let ok = self.may_pair(last, c);
            last = c;
            ok
        })
    }

    /// Whether some token may hold the characters `a`, `b` next to each other (always
    /// true when either is ASCII: only pairs of non-ASCII characters are indexed).
    #[inline]
    fn may_pair(&self, a: char, b: char) -> bool {
        pair_bit(a, b).is_none_or(|bit| self.char_pairs[bit / 64] & 1 << (bit % 64) != 0)
    }

    /// Reads and parses a tiktoken BPE file.
    pub fn load(path: &Path) -> Result<Self, TokenError> {
        let data = std::fs::read(path).map_err(|source| TokenError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Self::from_tiktoken_bytes(&data).map_err(|e| e.with_path(path))
    }

    /// Number of tokens in the vocabulary (special tokens excluded).
    pub fn len(&self) -> usize {
        self.short.len() + self.mid.len() + self.long.len()
    }

    /// The rank of the token packed as `key` (`pack`), if it has up to 15 bytes.
    #[inline]
    fn short_rank(&self, key: u128) -> u32 {
        if (key >> 120) as usize <= INLINE_MAX {
            let inline = inline_key(key);
            self.short
                .find(key_hash(inline), |&e| e & INLINE_KEY == inline)
                .map_or(NO_RANK, |&e| (e >> 96) as u32)
        } else {
            self.mid
                .find(key_hash(key), |&e| entry_key(&self.arena, e) == key)
                .map_or(NO_RANK, |&e| (e >> 32) as u32)
        }
    }

    /// Whether the vocabulary holds no token (never, once loaded).
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Exact token count of `text` as tiktoken's `encode_ordinary` gives it:
    /// special-token text is ordinary text, no normalization.
    pub fn count(&self, text: &str) -> u64 {
        let classes = classes();
        let bytes = text.as_bytes();
        let mut scratch = SCRATCH.with(|s| s.borrow_mut().take()).unwrap_or_default();
        if scratch.vocab != self.id {
            scratch.cache.fill(0);
            scratch.vocab = self.id;
        }
        let mut total = 0u64;
        let mut pos = 0;
        while pos < bytes.len() {
            let end = piece_end(classes, bytes, pos);
            let n = end - pos;
            total += if (3..=PACKED_MAX).contains(&n) {
                self.cached_count(&bytes[pos..], n, &mut scratch)
            } else {
                self.piece_count(&bytes[pos..], n, &mut scratch)
            } as u64;
            pos = end;
        }
        SCRATCH.with(|s| *s.borrow_mut() = Some(scratch));
        total
    }

    /// `piece_count` of a piece of 3 to `PACKED_MAX` bytes through the thread's
    /// piece cache: a piece's count depends on its bytes alone (pre-tokenization
    /// cuts the text where merges cannot cross), and text repeats its words, so a
    /// small table that stays in the processor's cache answers most pieces.
    #[inline]
    fn cached_count(&self, window: &[u8], n: usize, scratch: &mut Scratch) -> usize {
        let key = match window.get(..16) {
            Some(chunk) => word_key(u128::from_le_bytes(chunk.try_into().expect("16 bytes")), n),
            None => pack(&window[..n]),
        };
        let slot = key_hash(key) as usize & (CACHE_SLOTS - 1);
        let entry = scratch.cache[slot];
        if entry & !CACHE_COUNT == key {
            return (entry >> 124) as usize;
        }
        let count = self.piece_count(window, n, scratch);
        // A piece of at most 15 bytes has at most 15 tokens: the count fits in the
        // four bits above the length (which is at most 15 too).
        scratch.cache[slot] = key | (count as u128) << 124;
        count
    }

    /// Exact token count as tiktoken's `encode(text, allowed_special="all")`
    /// with dashscope's Qwen special tokens: each of `<|endoftext|>`,
    /// `<|im_start|>`, `<|im_end|>`, `<|extra_0|>`..`<|extra_204|>` counts one
    /// token and splits the text around it.
    pub fn count_with_specials(&self, text: &str) -> u64 {
        let mut total = 0;
        let mut segment_start = 0;
        let mut search = 0;
        while let Some(offset) = text[search..].find("<|") {
            let at = search + offset;
            match special_len(&text.as_bytes()[at..]) {
                Some(len) => {
                    total += self.count(&text[segment_start..at]) + 1;
                    segment_start = at + len;
                    search = segment_start;
                }
                None => search = at + 1,
            }
        }
        total + self.count(&text[segment_start..])
    }

    /// What `dashscope.get_tokenizer(...).encode(text)` returns the length
    /// of, for text already NFC-normalized: specials allowed, long texts
    /// encoded in chunks split at newlines.
    fn dashscope_count(&self, nfc_text: &str) -> u64 {
        dashscope_chunks(nfc_text)
            .into_iter()
            .map(|chunk| self.count_with_specials(chunk))
            .sum()
    }

    #[inline]
    fn rank(&self, bytes: &[u8]) -> u32 {
        if bytes.len() <= PACKED_MAX {
            self.short_rank(pack(bytes))
        } else if bytes.len() <= self.max_token_len {
            self.long.get(bytes).copied().unwrap_or(NO_RANK)
        } else {
            NO_RANK
        }
    }

    /// `rank(&window[start..end])`, reading the packed key with one 16-byte
    /// load when the window (the piece and the rest of the text) allows.
    #[inline]
    fn rank_in(&self, window: &[u8], start: usize, end: usize) -> u32 {
        let len = end - start;
        if len <= PACKED_MAX {
            if let Some(chunk) = window.get(start..start + 16) {
                let word = u128::from_le_bytes(chunk.try_into().expect("16 bytes"));
                return self.short_rank(word_key(word, len));
            }
        }
        self.rank(&window[start..end])
    }

    #[inline]
    fn pair_rank(&self, a: u8, b: u8) -> u32 {
        self.pair_ranks[usize::from(a) << 8 | usize::from(b)]
    }

    /// Tokens of the piece `window[..n]`; `window` runs on to the end of the
    /// text.
    #[inline]
    fn piece_count(&self, window: &[u8], n: usize, scratch: &mut Scratch) -> usize {
        match n {
            0 => 0,
            1 => 1,
            2 => {
                if self.pair_rank(window[0], window[1]) == NO_RANK {
                    2
                } else {
                    1
                }
            }
            _ => {
                // As tiktoken does, a piece that is a token is one (whatever its merges).
                let chars = n >= 5 && !window[..n].is_ascii();
                if (!chars || self.may_be_token(&window[..n]))
                    && self.rank_in(window, 0, n) != NO_RANK
                {
                    1
                } else if chars {
                    self.merge_chars(window, n, scratch)
                } else if n <= SMALL_PIECE {
                    self.merge_small(window, n)
                } else {
                    self.merge_heap(window, n, scratch)
                }
            }
        }
    }

    /// tiktoken's `_byte_pair_merge` on `window[..n]`, counting the parts
    /// left.
    fn merge_small(&self, window: &[u8], n: usize) -> usize {
        debug_assert!((3..=SMALL_PIECE).contains(&n));
        // Part i starts at starts[i]; ranks[i] is the rank of merging parts
        // i and i + 1. Separate arrays keep the minimum search vectorizable.
        let mut starts = [0u32; SMALL_PIECE + 1];
        let mut ranks = [NO_RANK; SMALL_PIECE + 1];
        for i in 0..n - 1 {
            ranks[i] = self.pair_rank(window[i], window[i + 1]);
        }
        for (i, start) in starts[..=n].iter_mut().enumerate() {
            *start = i as u32;
        }
        let mut len = n + 1;
        loop {
            let min = ranks[..len - 1].iter().copied().min().unwrap_or(NO_RANK);
            if min == NO_RANK {
                break;
            }
            let i = ranks[..len - 1]
                .iter()
                .position(|&r| r == min)
                .expect("the minimum is present");
            if i > 0 {
                ranks[i - 1] = if i + 2 < len {
                    self.rank_in(window, starts[i - 1] as usize, starts[i + 2] as usize)
                } else {
                    NO_RANK
                };
            }
            ranks[i] = if i + 3 < len {
                self.rank_in(window, starts[i] as usize, starts[i + 3] as usize)
            } else {
                NO_RANK
            };
            starts.copy_within(i + 2..len, i + 1);
            ranks.copy_within(i + 2..len, i + 1);
            len -= 1;
        }
        len - 1
    }

    /// The same merges as `merge_small` (lowest rank first, leftmost among
    /// equals) in O(n log n) on `window[..n]`: parts form a linked list
    /// indexed by start byte, and a heap entry `rank << 32 | start` is live
    /// while the part at `start` still merges with that rank.
    fn merge_heap(&self, window: &[u8], n: usize, scratch: &mut Scratch) -> usize {
        let Scratch {
            next,
            prev,
            ranks,
            heap,
            ..
        } = scratch;
        next.clear();
        next.extend(1..=n as u32);
        prev.clear();
        prev.extend((0..n as u32).map(|i| i.wrapping_sub(1)));
        ranks.clear();
        ranks.extend(window[..n].windows(2).map(|w| self.pair_rank(w[0], w[1])));
        ranks.push(NO_RANK);
        let mut entries = std::mem::take(heap).into_vec();
        entries.clear();
        entries.extend(
            ranks
                .iter()
                .enumerate()
                .filter(|&(_, &rank)| rank != NO_RANK)
                .map(|(i, &rank)| Reverse(u64::from(rank) << 32 | i as u64)),
        );
        *heap = BinaryHeap::from(entries);
        let mut parts = n;
        while let Some(Reverse(entry)) = heap.pop() {
            let (rank, i) = ((entry >> 32) as u32, entry as u32 as usize);
            if ranks[i] != rank {
                continue;
            }
            // Merge part i with the next one, j, which ends at k.
            let j = next[i] as usize;
            let k = next[j] as usize;
            ranks[j] = NO_RANK;
            next[i] = k as u32;
            ranks[i] = if k < n {
                prev[k] = i as u32;
                self.rank_in(window, i, next[k] as usize)
            } else {
                NO_RANK
            };
            if ranks[i] != NO_RANK {
                heap.push(Reverse(u64::from(ranks[i]) << 32 | i as u64));
            }
            if i > 0 {
                let p = prev[i] as usize;
                ranks[p] = self.rank_in(window, p, k);
                if ranks[p] != NO_RANK {
                    heap.push(Reverse(u64::from(ranks[p]) << 32 | p as u64));
                }
            }
            parts -= 1;
        }
        parts
    }

    /// Fills `chars` with the start and `char_done` of each character of `window[..n]`,
    /// `NO_RANK` for a character that starts as its bytes (see `merge_chars`).
    fn char_parts(&self, window: &[u8], n: usize, chars: &mut Vec<(u32, u32)>) {
        chars.clear();
        let mut i = 0;
        while i < n {
            let b0 = window[i];
            let (code, len) = match b0 {
                0x00..=0x7F => (u32::from(b0), 1),
                0xC0..=0xDF => (
                    u32::from(b0 & 0x1F) << 6 | u32::from(window[i + 1] & 0x3F),
                    2,
                ),
                0xE0..=0xEF => (
                    u32::from(b0 & 0x0F) << 12
                        | u32::from(window[i + 1] & 0x3F) << 6
                        | u32::from(window[i + 2] & 0x3F),
                    3,
                ),
                _ => (u32::MAX, 4),
            };
            let done = self
                .char_done
                .get(code as usize)
                .copied()
                .unwrap_or(NO_RANK);
            if let Some(&mut (_, ref mut before)) = chars.last_mut() {
                let pair = u16::from(window[i - 1]) << 8 | u16::from(b0);
                let both_bytes = *before == NO_RANK && done == NO_RANK;
                if !both_bytes {
                    let listed = self.cross_bits[usize::from(pair) / 64] & 1 << (pair % 64) != 0;
                    if let Some(&min) = listed.then(|| self.cross_min.get(&pair)).flatten() {
                        let limit = |d: u32| if d == NO_RANK { 0 } else { d };
                        if min <= limit(*before).max(limit(done)) {
                            *before = NO_RANK;
                            chars.push((i as u32, NO_RANK));
                            i += len;
                            continue;
                        }
                    }
                }
            }
            chars.push((i as u32, done));
            i += len;
        }
    }

    /// `merge_chars` when every character of `window[..n]` starts whole (`chars`:
    /// start and `char_done` of each, at most `CHAR_SCAN_MAX`), by tiktoken's linear
    /// scan for the lowest rank, with no event for a character becoming whole: `None`
    /// when that would not give the same merges.
    ///
    /// Why it is the same: `merge_chars` lets a single character merge only from its
    /// `char_done` on. As long as every merge ever in view ranks above the `char_done`
    /// of each single character in it, that delay never holds a merge back (by its
    /// rank, both sides are whole by then), so the merges come in the same order.
    /// The first merge in view that does not (a rank at or below a neighbour's
    /// `char_done`) gives up, before any merge that could differ is made.
    fn merge_whole_chars(&self, window: &[u8], n: usize, chars: &[(u32, u32)]) -> Option<usize> {
        let k = chars.len();
        debug_assert!((1..=CHAR_SCAN_MAX).contains(&k));
        // Part i starts at starts[i]; done[i]: its character's `char_done` while it is
        // one character, 0 once merged; ranks[i]: the rank of merging parts i, i + 1.
        // first[i]: the index in `chars` of part i's first character.
        let mut starts = [0u32; CHAR_SCAN_MAX + 1];
        let mut first = [0u8; CHAR_SCAN_MAX + 1];
        let mut done = [0u32; CHAR_SCAN_MAX];
        let mut ranks = [NO_RANK; CHAR_SCAN_MAX];
        let mut codes = ['\0'; CHAR_SCAN_MAX];
        let text = std::str::from_utf8(&window[..n]).ok()?;
        for (c, (&(start, d), code)) in chars.iter().zip(text.chars()).enumerate() {
            starts[c] = start;
            first[c] = c as u8;
            done[c] = d;
            codes[c] = code;
        }
        starts[k] = n as u32;
        first[k] = k as u8;
        // The rank of merging parts i and i + 1 of `len`, if no delay can hold it back.
        let pair = |starts: &[u32], first: &[u8], done: &[u32], i: usize, len: usize| {
            if i + 1 >= len {
                return Some(NO_RANK);
            }
            let joint = usize::from(first[i + 1]);
            if !self.may_pair(codes[joint - 1], codes[joint]) {
                return Some(NO_RANK);
            }
            let rank = self.rank_in(window, starts[i] as usize, starts[i + 2] as usize);
            (rank == NO_RANK || rank > done[i].max(done[i + 1])).then_some(rank)
        };
        for (i, rank) in ranks[..k - 1].iter_mut().enumerate() {
            *rank = pair(&starts, &first, &done, i, k)?;
        }
        let mut len = k;
        loop {
            let min = ranks[..len - 1].iter().copied().min().unwrap_or(NO_RANK);
            if min == NO_RANK {
                return Some(len);
            }
            let i = ranks[..len - 1]
                .iter()
                .position(|&r| r == min)
                .expect("the minimum is present");
            starts.copy_within(i + 2..=len, i + 1);
            first.copy_within(i + 2..=len, i + 1);
            done.copy_within(i + 2..len, i + 1);
            ranks.copy_within(i + 2..len, i + 1);
            done[i] = 0;
            len -= 1;
            ranks[i] = pair(&starts, &first, &done, i, len)?;
            if i > 0 {
                ranks[i - 1] = pair(&starts, &first, &done, i - 1, len)?;
            }
        }
    }

    /// The same merges as `merge_heap` on `window[..n]` (which holds a non-ASCII
    /// character), starting from whole characters rather than bytes wherever that
    /// gives the same result: elsewhere a character starts as its bytes.
    ///
    /// Why it is the same: the merges inside a character `c` rank at most
    /// `char_done[c]`. A merge that joins part of a character to another makes a
    /// token counted in `cross_min` for a boundary next to that character; when
    /// `cross_min` of both boundaries of a character is above its `char_done`, no
    /// such merge can come before it is whole, and none after. So it can start as a
    /// part that becomes whole at its own rank (an event in the heap, in rank order
    /// with the merges), and only whole parts merge. Characters where that does not
    /// hold (or not in `char_done`) start as their bytes, whose merges are all made
    /// here; starting a character as bytes only loosens the check of its neighbours.
    fn merge_chars(&self, window: &[u8], n: usize, scratch: &mut Scratch) -> usize {
        let Scratch {
            next,
            prev,
            ranks,
            heap,
            starts,
            pending,
            chars,
            ..
        } = scratch;
        // (start, char_done) of each character; `NO_RANK`: starts as its bytes.
        self.char_parts(window, n, chars);
        if chars.len() <= CHAR_SCAN_MAX && chars.iter().all(|&(_, done)| done != NO_RANK) {
            if let Some(parts) = self.merge_whole_chars(window, n, chars) {
                return parts;
            }
        }
        // Parts: whole characters pending until their rank, or single bytes.
        starts.clear();
        pending.clear();
        for (c, &(start, done)) in chars.iter().enumerate() {
            if done == NO_RANK {
                let end = chars.get(c + 1).map_or(n as u32, |&(s, _)| s);
                starts.extend(start..end);
                pending.extend((start..end).map(|_| 0));
            } else {
                starts.push(start);
                pending.push(done);
            }
        }
        let k = starts.len();
        starts.push(n as u32);
        next.clear();
        next.extend(1..=k as u32);
        prev.clear();
        prev.extend((0..k as u32).map(|p| p.wrapping_sub(1)));
        ranks.clear();
        ranks.resize(k, NO_RANK);
        let mut entries = std::mem::take(heap).into_vec();
        entries.clear();
        // `pending[p]`: the rank at which part p becomes whole, 0 once it is.
        for p in 0..k {
            if pending[p] != 0 {
                entries.push(Reverse(u64::from(pending[p]) << 32 | p as u64));
            } else if p + 1 < k && pending[p + 1] == 0 {
                ranks[p] = self.rank_in(window, starts[p] as usize, starts[p + 2] as usize);
                if ranks[p] != NO_RANK {
                    entries.push(Reverse(u64::from(ranks[p]) << 32 | p as u64));
                }
            }
        }
        *heap = BinaryHeap::from(entries);
        let end = |next: &[u32], p: usize| starts[next[p] as usize] as usize;
        let mut parts = k;
        while let Some(Reverse(entry)) = heap.pop() {
            let (rank, p) = ((entry >> 32) as u32, entry as u32 as usize);
            if pending[p] != 0 {
                if pending[p] != rank {
                    continue;
                }
                // Part p becomes whole: it may now merge with whole neighbours.
                pending[p] = 0;
            } else {
                if ranks[p] != rank {
                    continue;
                }
                // Merge part p with the next one, q.
                let q = next[p] as usize;
                ranks[q] = NO_RANK;
                next[p] = next[q];
                if (next[p] as usize) < k {
                    prev[next[p] as usize] = p as u32;
                }
                parts -= 1;
            }
            let r = next[p] as usize;
            ranks[p] = if r < k && pending[r] == 0 {
                self.rank_in(window, starts[p] as usize, end(next, r))
            } else {
                NO_RANK
            };
            if ranks[p] != NO_RANK {
                heap.push(Reverse(u64::from(ranks[p]) << 32 | p as u64));
            }
            if p > 0 {
                let o = prev[p] as usize;
                if pending[o] == 0 {
                    ranks[o] = self.rank_in(window, starts[o] as usize, end(next, p));
                    if ranks[o] != NO_RANK {
                        heap.push(Reverse(u64::from(ranks[o]) << 32 | o as u64));
                    }
                }
            }
        }
        parts
    }
}

/// Slots of the per-thread piece cache (16 bytes each).
const CACHE_SLOTS: usize = 2048;
/// The bits of a piece cache slot that hold the count.
const CACHE_COUNT: u128 = 0xF << 124;

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

thread_local! {
    /// Each thread's buffers and piece cache, reused from one count to the next.
    static SCRATCH: RefCell<Option<Box<Scratch>>> = const { RefCell::new(None) };
}

/// Bits of `Vocabulary::char_pairs` (128 KiB; about 2 % set with Qwen's vocabulary).
const CHAR_PAIR_BITS: usize = 1 << 20;

/// The bit of `Vocabulary::char_pairs` for `a` followed by `b`, when both are non-ASCII.
#[inline]
fn pair_bit(a: char, b: char) -> Option<usize> {
    if a.is_ascii() || b.is_ascii() {
        return None;
    }
    let key = (u64::from(a) << 21 | u64::from(b)).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    Some((key >> (64 - CHAR_PAIR_BITS.trailing_zeros())) as usize)
}

/// Most characters `merge_whole_chars` takes (more go through the heap).
const CHAR_SCAN_MAX: usize = 64;

/// Buffers the merges reuse from one piece to the next, and the piece cache:
/// `pack(piece) | count << 124` per slot (0: empty; no cached piece is that short),
/// for the vocabulary `vocab`.
struct Scratch {
    vocab: u64,
    cache: Box<[u128]>,
    next: Vec<u32>,
    prev: Vec<u32>,
    ranks: Vec<u32>,
    heap: BinaryHeap<Reverse<u64>>,
    starts: Vec<u32>,
    pending: Vec<u32>,
    chars: Vec<(u32, u32)>,
}

impl Default for Scratch {
    fn default() -> Self {
        Scratch {
            vocab: 0,
            cache: vec![0; CACHE_SLOTS].into_boxed_slice(),
            next: Vec::new(),
            prev: Vec::new(),
            ranks: Vec::new(),
            heap: BinaryHeap::new(),
            starts: Vec::new(),
            pending: Vec::new(),
            chars: Vec::new(),
        }
    }
}

/// Longest token `pack` takes (kept in `Vocabulary::short` or `mid`).
const PACKED_MAX: usize = 15;
/// Longest token kept in `Vocabulary::short`, in its slot.
const INLINE_MAX: usize = 11;
/// The bytes and the length of a `Vocabulary::short` slot.
const INLINE_KEY: u128 = (1 << 96) - 1;

/// A packed key (`pack`, at most `INLINE_MAX` bytes) with its length moved down to
/// bits 88..92, under the rank of a `Vocabulary::short` slot.
#[inline(always)]
fn inline_key(key: u128) -> u128 {
    key & ((1 << 88) - 1) | (key >> 120) << 88
}

/// A byte string of at most `PACKED_MAX` bytes as one integer: the bytes,
/// then the length in the top byte (so that trailing zero bytes count).
#[inline]
fn pack(bytes: &[u8]) -> u128 {
    debug_assert!(bytes.len() <= PACKED_MAX);
    let mut buf = [0u8; 16];
    buf[..bytes.len()].copy_from_slice(bytes);
    buf[15] = bytes.len() as u8;
    u128::from_le_bytes(buf)
}

/// The packed bytes (`pack`) of the token a `Vocabulary::short` entry points at in
/// `arena` (which holds 16 bytes past any token's start).
#[inline(always)]
fn entry_key(arena: &[u8], entry: u64) -> u128 {
    let start = (entry as u32 >> 4) as usize;
    let len = (entry & 0xF) as usize;
    word_key(
        u128::from_le_bytes(arena[start..start + 16].try_into().expect("16 bytes")),
        len,
    )
}

/// `pack` of the first `len` (at most 15) bytes of `word`, read as little-endian.
#[inline(always)]
fn word_key(word: u128, len: usize) -> u128 {
    word & ((1u128 << (8 * len)) - 1) | (len as u128) << 120
}

/// Hash of a packed token: the two halves multiplied as 128-bit numbers and folded
/// (the mixing step of foldhash and ahash), cheap and well spread in every bit.
#[inline(always)]
fn key_hash(key: u128) -> u64 {
    // The high half holds the length (at most 15) in its top byte or in bits 88..92,
    // never matching 0x13 there: the factors are never zero.
    let lo = key as u64 ^ 0x243F_6A88_85A3_08D3;
    let hi = (key >> 64) as u64 ^ 0x1319_8A2E_0370_7344;
    let full = u128::from(lo).wrapping_mul(u128::from(hi));
    full as u64 ^ (full >> 64) as u64
}

/// Base64 digit values, 0xFF for a byte that is none.
const BASE64: [u8; 256] = {
    let mut table = [0xFF; 256];
    let digits = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut i = 0;
    while i < 64 {
        table[digits[i] as usize] = i as u8;
        i += 1;
    }
    table
};

/// A line as tiktoken writes it, `<base64> <rank>` with canonical standard base64 and
/// at most 9 digits: (token length, rank, token). A token of up to 15 bytes comes back
/// in the `u128` (little-endian, the rest zero), a longer one in `buf`. `None` for
/// anything else (the general path then parses it, or words the error): what this
/// accepts, the general path reads the same way.
#[inline]
fn fast_line(line: &[u8], buf: &mut [u8; 96]) -> Option<(usize, u32, u128)> {
    let space = line.iter().position(|&b| b == b' ')?;
    let (b64, digits) = (&line[..space], &line[space + 1..]);
    if digits.is_empty() || digits.len() > 9 || b64.is_empty() || b64.len() % 4 != 0 {
        return None;
    }
    if b64.len() / 4 * 3 > buf.len() {
        return None;
    }
    let mut rank = 0u32;
    for &d in digits {
        let v = d.wrapping_sub(b'0');
        if v > 9 {
            return None;
        }
        rank = rank * 10 + u32::from(v);
    }
    // Up to 20 digits decode to at most 15 bytes: kept in a register.
    let small = b64.len() <= 20;
    let mut word = 0u128;
    let mut out = 0;
    let groups = b64.len() / 4;
    for (g, quad) in b64.chunks_exact(4).enumerate() {
        let (value, count) = base64_group(quad, g + 1 == groups)?;
        if small {
            // The bytes big-endian in `value`; little-endian in `word`.
            let le = (value >> 16) & 0xFF | value & 0xFF00 | (value & 0xFF) << 16;
            word |= u128::from(le) << (8 * out);
        } else {
            buf[out..out + count].copy_from_slice(&value.to_be_bytes()[1..1 + count]);
        }
        out += count;
    }
    Some((out, rank, word))
}

/// One group of four base64 digits: its bytes (big-endian in the low 24 bits, zero
/// past the count) and their count, 3, or 1 or 2 for canonical padding in the last
/// group.
#[inline(always)]
fn base64_group(quad: &[u8], last: bool) -> Option<(u32, usize)> {
    let [a, b, c, d] = [quad[0], quad[1], quad[2], quad[3]].map(|x| BASE64[usize::from(x)]);
    if (a | b | c | d) < 64 {
        let n = u32::from(a) << 18 | u32::from(b) << 12 | u32::from(c) << 6 | u32::from(d);
        return Some((n, 3));
    }
    // Padding, only in the last group: "xx==" (one byte) or "xxx=" (two).
    if !last || a > 63 || b > 63 || quad[3] != b'=' {
        return None;
    }
    if quad[2] == b'=' {
        (b & 0x0F == 0).then_some((u32::from(a) << 18 | u32::from(b) << 12, 1))
    } else {
        (c < 64 && c & 0x03 == 0).then_some((
            u32::from(a) << 18 | u32::from(b) << 12 | u32::from(c) << 6,
            2,
        ))
    }
}

/// Rank -> line of the first `lines` lines of `data`, already read without error.
fn rank_lines(data: &[u8], lines: usize) -> FxHashMap<u32, usize> {
    let mut map = FxHashMap::default();
    for (index, line) in data.split(|&b| b == b'\n').take(lines).enumerate() {
        let rank = line
            .split(|b| b.is_ascii_whitespace())
            .filter(|f| !f.is_empty())
            .nth(1)
            .and_then(parse_rank);
        if let Some(rank) = rank {
            map.insert(rank, index + 1);
        }
    }
    map
}

/// A rank: decimal digits that fit a u32, `u32::MAX` excluded (tiktoken's "no rank").
fn parse_rank(text: &[u8]) -> Option<u32> {
    std::str::from_utf8(text)
        .ok()
        .and_then(|s| s.parse::<u32>().ok())
        .filter(|&r| r != NO_RANK)
}

/// `pair_ranks[a << 8 | b]`.
fn self_pair(pair_ranks: &[u32], a: u8, b: u8) -> u32 {
    pair_ranks[usize::from(a) << 8 | usize::from(b)]
}

/// Length of the Qwen special token at the start of `bytes`, if any.
fn special_len(bytes: &[u8]) -> Option<usize> {
    let rest = bytes.strip_prefix(b"<|")?;
    for name in [&b"endoftext|>"[..], b"im_start|>", b"im_end|>"] {
        if rest.starts_with(name) {
            return Some(2 + name.len());
        }
    }
    let digits_and_end = rest.strip_prefix(b"extra_")?;
    let digits = digits_and_end
        .iter()
        .take_while(|b| b.is_ascii_digit())
        .count();
    if !(1..=3).contains(&digits) || !digits_and_end[digits..].starts_with(b"|>") {
        return None;
    }
    let number = &digits_and_end[..digits];
    if digits > 1 && number[0] == b'0' {
        return None;
    }
    let value: usize = std::str::from_utf8(number).ok()?.parse().ok()?;
    (value < 205).then_some(2 + 6 + digits + 2)
}

/// dashscope's `QwenTokenizer._split_text` when the text exceeds its chunk
/// size, else the whole text: lines (each but the first keeping its leading
/// newline) grouped greedily into chunks of at most 100,000 code points.
fn dashscope_chunks(text: &str) -> Vec<&str> {
    if text.len() <= DASHSCOPE_CHUNK_CHARS || text.chars().count() <= DASHSCOPE_CHUNK_CHARS {
        return vec![text];
    }
    // (start, end, code points) of each part, as byte ranges of `text`.
    let mut parts: Vec<(usize, usize, usize)> = Vec::new();
    let mut line_start = 0;
    for (index, line) in text.split('\n').enumerate() {
        let start = if index == 0 { 0 } else { line_start - 1 };
        let end = line_start + line.len();
        line_start = end + 1;
        let piece = &text[start..end];
        let chars = piece.chars().count();
        if chars <= DASHSCOPE_CHUNK_CHARS {
            parts.push((start, end, chars));
        } else {
            let mut chunk_start = start;
            let mut in_chunk = 0;
            for (offset, _) in piece.char_indices() {
                if in_chunk == DASHSCOPE_CHUNK_CHARS {
                    parts.push((chunk_start, start + offset, in_chunk));
                    chunk_start = start + offset;
                    in_chunk = 0;
                }
                in_chunk += 1;
            }
            parts.push((chunk_start, end, in_chunk));
        }
    }
    let mut chunks = Vec::new();
    let mut current: Option<(usize, usize, usize)> = None;
    for (start, end, chars) in parts {
        current = match current {
            Some((c_start, _, c_chars)) if c_chars + chars <= DASHSCOPE_CHUNK_CHARS => {
                Some((c_start, end, c_chars + chars))
            }
            Some((c_start, c_end, _)) => {
                chunks.push(&text[c_start..c_end]);
                Some((start, end, chars))
            }
            None => Some((start, end, chars)),
        };
    }
    if let Some((c_start, c_end, _)) = current {
        chunks.push(&text[c_start..c_end]);
    }
    chunks
}

/// Ranges of characters that are NFC_Quick_Check=Yes with combining class
/// 0: a text of these alone is in NFC. Covers Latin-1 and Latin Extended,
/// CJK, kana, Hangul syllables and fullwidth forms, so that common text
/// skips the normalization tables.
const SURELY_NFC: &[(u32, u32)] = &[
    (0x0000, 0x02FF),
    (0x2010, 0x206F),
    (0x3000, 0x3029),
    (0x3030, 0x3098),
    (0x309B, 0x30FF),
    (0x3400, 0x4DBF),
    (0x4E00, 0x9FFF),
    (0xAC00, 0xD7A3),
    (0xFF00, 0xFFEF),
];

fn surely_nfc(text: &str) -> bool {
    if text.is_ascii() {
        return true;
    }
    let bytes = text.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let (c, len) = decode(bytes, i);
        if c >= 0x300 && !SURELY_NFC.iter().any(|&(a, b)| (a..=b).contains(&c)) {
            return false;
        }
        i += len;
    }
    true
}

/// `text` in Unicode NFC, borrowed when it already is.
fn nfc(text: &str) -> Cow<'_, str> {
    if surely_nfc(text) || is_nfc_quick(text.chars()) == IsNormalized::Yes {
        return Cow::Borrowed(text);
    }
    let normalized: String = text.nfc().collect();
    if normalized == text {
        Cow::Borrowed(text)
    } else {
        Cow::Owned(normalized)
    }
}

/// Upper bound of the tokens the service bills for `text` as message content
/// (framing excluded).
///
/// With the vocabulary, the largest of: the exact count of the NFC form (the
/// service normalizes, as dashscope's tokenizer does), of the text as sent,
/// and what dashscope's tokenizer counts (special tokens and chunking). All
/// agree unless the text is not in NFC, holds `<|`, or exceeds 100,000 code
/// points. Without it, the UTF-8 length of the longer of the text and its NFC
/// form: each byte-level BPE token covers at least one byte.
pub fn text_bound(vocab: Option<&Vocabulary>, text: &str) -> u64 {
    let normalized = nfc(text);
    let Some(vocab) = vocab else {
        return text.len().max(normalized.len()) as u64;
    };
    let mut bound = vocab.count(&normalized);
    if let Cow::Owned(_) = normalized {
        bound = bound.max(vocab.count(text));
    }
    if normalized.contains("<|") || normalized.len() > DASHSCOPE_CHUNK_CHARS {
        bound = bound.max(vocab.dashscope_count(&normalized));
    }
    bound
}

/// One chat message, as the Python side flattens it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChatMessage<'a> {
    pub role: &'a str,
    pub content: &'a str,
}

/// Upper bound of the input tokens billed for a chat request (R8, docs/rules.md): per
/// message its framing and content, the reply primer, and the default system
/// message when no message has the role `"system"`.
pub fn chat_bound(vocab: Option<&Vocabulary>, messages: &[ChatMessage<'_>]) -> u64 {
    let mut total = REPLY_PRIMER;
    let mut has_system = false;
    for message in messages {
        has_system |= message.role == "system";
        total = total
            .saturating_add(MESSAGE_FRAMING)
            .saturating_add(text_bound(vocab, message.content));
    }
    if !has_system {
        total = total.saturating_add(DEFAULT_SYSTEM);
    }
    total
}

/// The vocabulary the input bound uses in this process: where it is, and the vocabulary
/// once loaded from there (so that a call finds it without touching the file system).
struct Active {
    path: Option<PathBuf>,
    loaded: Option<Arc<Vocabulary>>,
}

static ACTIVE: Mutex<Active> = Mutex::new(Active {
    path: None,
    loaded: None,
});

fn active() -> std::sync::MutexGuard<'static, Active> {
    ACTIVE.lock().unwrap_or_else(|p| p.into_inner())
}

/// Points the input bound at a `qwen.tiktoken` vocabulary file (`None`: none, byte bounds).
pub fn set_vocabulary_path(path: Option<PathBuf>) {
    let mut a = active();
    a.path = path;
    a.loaded = None;
}

/// The path of the vocabulary the input bound uses, if any.
pub fn vocabulary_path() -> Option<PathBuf> {
    active().path.clone()
}

/// The vocabulary the input bound uses, loaded once; `None` without one (or when it
/// cannot be read: the bound then counts bytes, which is safe).
pub fn vocabulary() -> Option<Arc<Vocabulary>> {
    if let Some(ready) = loaded_vocabulary() {
        return ready;
    }
    let path = vocabulary_path()?;
    let vocab = cached_vocabulary(&path).ok()?;
    let mut a = active();
    if a.path.as_deref() == Some(path.as_path()) {
        a.loaded = Some(Arc::clone(&vocab));
    }
    Some(vocab)
}

/// The vocabulary without any file-system work: `Some(None)` when none is set,
/// `Some(Some(v))` once it is loaded, `None` while it still has to be loaded.
pub fn loaded_vocabulary() -> Option<Option<Arc<Vocabulary>>> {
    let a = active();
    match (&a.path, &a.loaded) {
        (None, _) => Some(None),
        (Some(_), Some(v)) => Some(Some(Arc::clone(v))),
        (Some(_), None) => None,
    }
}

/// The vocabulary at `path`, loaded once per process and path. A failed load
/// is not remembered: the next call tries again.
pub fn cached_vocabulary(path: &Path) -> Result<Arc<Vocabulary>, TokenError> {
    static CACHE: OnceLock<Mutex<HashMap<PathBuf, Arc<Vocabulary>>>> = OnceLock::new();
    let key = std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf());
    let cache = CACHE.get_or_init(Default::default);
    // Held during the load so that concurrent first calls parse the file once.
    let mut map = cache
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if let Some(vocab) = map.get(&key) {
        return Ok(Arc::clone(vocab));
    }
    let vocab = Arc::new(Vocabulary::load(path)?);
    map.insert(key, Arc::clone(&vocab));
    Ok(vocab)
}

// ---------------------------------------------------------------------------
// Pre-tokenizer: a hand-written scanner equal to fancy-regex running
//
//   (?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}
//   | ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+
//
// (dashscope's PAT_STR) with leftmost-first alternation, several times
// faster than the backtracking regex tiktoken runs. Character classes come
// from regex-syntax's Unicode tables, the ones that regex engine uses.

const OTHER: u8 = 0;
const LETTER: u8 = 1;
const NUMBER: u8 = 2;
/// `\s` except `\r` and `\n`.
const SPACE: u8 = 3;
/// `\r` or `\n`.
const NEWLINE: u8 = 4;

struct Classes {
    bmp: Box<[u8]>,
    /// (first, last, class) of the classified ranges above U+FFFF, sorted.
    astral: Vec<(u32, u32, u8)>,
}

impl Classes {
    #[inline(always)]
    fn of(&self, c: u32) -> u8 {
        if let Some(&class) = self.bmp.get(c as usize) {
            return class;
        }
        match self.astral.binary_search_by(|&(first, last, _)| {
            if last < c {
                std::cmp::Ordering::Less
            } else if first > c {
                std::cmp::Ordering::Greater
            } else {
                std::cmp::Ordering::Equal
            }
        }) {
            Ok(index) => self.astral[index].2,
            Err(_) => OTHER,
        }
    }
}

fn unicode_ranges(pattern: &str) -> Vec<(u32, u32)> {
    let hir = regex_syntax::parse(pattern).expect("a valid Unicode class");
    match hir.kind() {
        HirKind::Class(Class::Unicode(class)) => class
            .ranges()
            .iter()
            .map(|r| (u32::from(r.start()), u32::from(r.end())))
            .collect(),
        other => unreachable!("{pattern} parsed to {other:?}"),
    }
}

fn classes() -> &'static Classes {
    static CLASSES: OnceLock<Classes> = OnceLock::new();
    CLASSES.get_or_init(|| {
        let mut bmp = vec![OTHER; 0x1_0000].into_boxed_slice();
        let mut astral = Vec::new();
        for (pattern, class) in [(r"\p{L}", LETTER), (r"\p{N}", NUMBER), (r"\s", SPACE)] {
            for (first, last) in unicode_ranges(pattern) {
                for c in first..=last.min(0xFFFF) {
                    bmp[c as usize] = class;
                }
                if last > 0xFFFF {
                    astral.push((first.max(0x1_0000), last, class));
                }
            }
        }
        bmp[usize::from(b'\r')] = NEWLINE;
        bmp[usize::from(b'\n')] = NEWLINE;
        astral.sort_unstable();
        Classes { bmp, astral }
    })
}

/// The code point starting at `bytes[i]` and its UTF-8 length; `bytes` is
/// valid UTF-8 and `i` a character boundary.
#[inline(always)]
fn decode(bytes: &[u8], i: usize) -> (u32, usize) {
    let b0 = bytes[i];
    if b0 < 0x80 {
        (u32::from(b0), 1)
    } else if b0 < 0xE0 {
        (
            u32::from(b0 & 0x1F) << 6 | u32::from(bytes[i + 1] & 0x3F),
            2,
        )
    } else if b0 < 0xF0 {
        (
            u32::from(b0 & 0x0F) << 12
                | u32::from(bytes[i + 1] & 0x3F) << 6
                | u32::from(bytes[i + 2] & 0x3F),
            3,
        )
    } else {
        (
            u32::from(b0 & 0x07) << 18
                | u32::from(bytes[i + 1] & 0x3F) << 12
                | u32::from(bytes[i + 2] & 0x3F) << 6
                | u32::from(bytes[i + 3] & 0x3F),
            4,
        )
    }
}

/// End of the run of characters of class `class` starting at `i`.
#[inline]
fn run_end(classes: &Classes, bytes: &[u8], mut i: usize, class: u8) -> usize {
    while i < bytes.len() {
        if bytes[i] < 0x80 {
            if classes.bmp[usize::from(bytes[i])] != class {
                break;
            }
            i += 1;
            continue;
        }
        let (c, len) = decode(bytes, i);
        if classes.of(c) != class {
            break;
        }
        i += len;
    }
    i
}

/// End of `(?i:'s|'t|'re|'ve|'m|'ll|'d)` after the apostrophe at `i - 1`.
/// Under Unicode case folding `s` also matches U+017F LATIN SMALL LETTER
/// LONG S; no other of these letters has a non-ASCII fold.
#[inline]
fn contraction_end(bytes: &[u8], i: usize) -> Option<usize> {
    let lower = |k: usize| bytes.get(k).map(u8::to_ascii_lowercase);
    match lower(i)? {
        b's' | b't' | b'm' | b'd' => Some(i + 1),
        b'r' | b'v' if lower(i + 1) == Some(b'e') => Some(i + 2),
        b'l' if lower(i + 1) == Some(b'l') => Some(i + 2),
        0xC5 if bytes.get(i + 1) == Some(&0xBF) => Some(i + 2),
        _ => None,
    }
}

/// End of the piece that starts at `pos` (< `bytes.len()`).
#[inline]
fn piece_end(classes: &Classes, bytes: &[u8], pos: usize) -> usize {
    let n = bytes.len();
    let (c0, len0) = decode(bytes, pos);
    let k0 = classes.of(c0);
    let p1 = pos + len0;
    match k0 {
        // [^\r\n\p{L}\p{N}]?\p{L}+ with the optional part empty
        LETTER => return run_end(classes, bytes, p1, LETTER),
        // \p{N}
        NUMBER => return p1,
        _ => {}
    }
    // (?i:'s|'t|'re|'ve|'m|'ll|'d)
    if c0 == u32::from(b'\'') {
        if let Some(end) = contraction_end(bytes, p1) {
            return end;
        }
    }
    let next = (p1 < n).then(|| {
        let (c1, len1) = decode(bytes, p1);
        (c1, classes.of(c1), len1)
    });
    // [^\r\n\p{L}\p{N}]?\p{L}+ with one leading character
    if k0 != NEWLINE {
        if let Some((_, LETTER, len1)) = next {
            return run_end(classes, bytes, p1 + len1, LETTER);
        }
    }
    // ` ?[^\s\p{L}\p{N}]+[\r\n]*`
    let others_from = if k0 == OTHER {
        Some(p1)
    } else if c0 == u32::from(b' ') {
        match next {
            Some((_, OTHER, len1)) => Some(p1 + len1),
            _ => None,
        }
    } else {
        None
    };
    if let Some(from) = others_from {
        let end = run_end(classes, bytes, from, OTHER);
        return end
            + bytes[end..]
                .iter()
                .take_while(|&&b| b == b'\r' || b == b'\n')
                .count();
    }
    // c0 is whitespace: scan the whole whitespace run.
    let mut last_newline = None;
    let mut last_start = pos;
    let mut chars = 0usize;
    let mut i = pos;
    while i < n {
        let (c, len) = decode(bytes, i);
        match classes.of(c) {
            NEWLINE => last_newline = Some(i),
            SPACE => {}
            _ => break,
        }
        last_start = i;
        chars += 1;
        i += len;
    }
    match last_newline {
        // \s*[\r\n]+ : up to the run's last line break
        Some(at) => at + 1,
        // \s+(?!\S) : to the end of the text, or all but the last character
        None if i == n => n,
        None if chars >= 2 => last_start,
        // \s+
        None => i,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const PAT_STR: &str = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+";

    fn pieces(text: &str) -> Vec<&str> {
        let classes = classes();
        let mut out = Vec::new();
        let mut pos = 0;
        while pos < text.len() {
            let end = piece_end(classes, text.as_bytes(), pos);
            out.push(&text[pos..end]);
            pos = end;
        }
        out
    }

    fn regex_pieces(text: &str) -> Vec<&str> {
        static RE: OnceLock<fancy_regex::Regex> = OnceLock::new();
        RE.get_or_init(|| fancy_regex::Regex::new(PAT_STR).unwrap())
            .find_iter(text)
            .map(|m| m.unwrap().as_str())
            .collect()
    }

    /// A tiny vocabulary: every byte, then `merges` in rank order.
    fn tiny_vocab(merges: &[&str]) -> Vocabulary {
        let engine = base64::engine::general_purpose::STANDARD;
        let mut file = String::new();
        let tokens = (0..=255u8)
            .map(|b| vec![b])
            .chain(merges.iter().map(|m| m.as_bytes().to_vec()));
        for (rank, token) in tokens.enumerate() {
            file.push_str(&format!("{} {rank}\n", engine.encode(token)));
        }
        Vocabulary::from_tiktoken_bytes(file.as_bytes()).unwrap()
    }

    /// Tiny xorshift generator: the tests need no dependency for randomness.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn pick<'a>(&mut self, items: &[&'a str]) -> &'a str {
            items[(self.next() % items.len() as u64) as usize]
        }
    }

    fn random_text(rng: &mut Rng, len: usize) -> String {
        const ATOMS: &[&str] = &[
            " ",
            " ",
            "  ",
            "\t",
            "\n",
            "\r\n",
            "\r",
            "\u{3000}",
            "\u{a0}",
            "\u{85}",
            "\u{2028}",
            "\x0b",
            "a",
            "Z",
            "hello",
            " world",
            "'",
            "'s",
            "'S",
            "'ll",
            "'LL",
            "'re",
            "'Ve",
            "'d",
            "'M",
            "'t",
            "'ſ",
            "ſ",
            "'x",
            "1",
            "42",
            "١",
            "Ⅻ",
            "½",
            "中",
            "文字",
            "。",
            "，",
            "!",
            "?!",
            "...",
            "-",
            "_",
            "(",
            ")",
            "{",
            "}",
            "\"",
            "é",
            "e\u{301}",
            "\u{301}",
            "😀",
            "👍🏽",
            "\u{200d}",
            "ß",
            "ǅ",
            "ʰ",
            "\u{10400}",
            "\u{1d7ce}",
            "\u{e000}",
            "\u{fffd}",
            "<|",
            "|>",
            "<|im_start|>",
            "<|extra_7|>",
            "#",
            "$",
            "😀a",
            ".\n",
            "\u{feff}",
            "ก",
            "\u{e31}",
            "ا",
            "ע",
            "한",
        ];
        let mut text = String::new();
        for _ in 0..len {
            text.push_str(rng.pick(ATOMS));
        }
        text
    }

    #[test]
    fn scanner_matches_pat_str_on_handwritten_cases() {
        for text in [
            "hello  world\n\n  x",
            "I'LL say it's 'ſa 'sa 'see",
            "a \t b\u{3000}\u{3000}c   ",
            "x \n \n y",
            " !!\n\n\r\nz",
            "\t!",
            "1234 56",
            "",
        ] {
            assert_eq!(pieces(text), regex_pieces(text), "{text:?}");
        }
    }

    #[test]
    fn scanner_matches_pat_str_on_random_text() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for round in 0..3000 {
            let text = random_text(&mut rng, 1 + round % 40);
            assert_eq!(pieces(&text), regex_pieces(&text), "{text:?}");
        }
    }

    #[test]
    fn long_s_and_ascii_cases_fold_as_regex_does() {
        for letter in ["s", "t", "r", "e", "v", "m", "l", "d"] {
            let folded = unicode_ranges(&format!("(?i){letter}"));
            let mut chars: Vec<char> = folded
                .iter()
                .flat_map(|&(a, b)| (a..=b).filter_map(char::from_u32))
                .collect();
            chars.sort_unstable();
            let mut expected = vec![
                letter.to_ascii_uppercase().chars().next().unwrap(),
                letter.chars().next().unwrap(),
            ];
            if letter == "s" {
                expected.push('ſ');
            }
            assert_eq!(chars, expected, "{letter}");
        }
    }

    #[test]
    fn tiny_vocabulary_merges_like_tiktoken() {
        // Ranks: every byte, then these merges in this order.
        let vocab = tiny_vocab(&["ll", "he", "hell", "hello", "o ", " w", "wo", "or"]);
        assert_eq!(vocab.len(), 264);
        // "hello" is a token.
        assert_eq!(vocab.count("hello"), 1);
        // " world" -> " w" + "or" + "l" + "d" (" w" ranks above "wo").
        assert_eq!(vocab.count(" world"), 4);
        // "hellhell": "ll" twice, "he" twice, then "hell" twice.
        assert_eq!(vocab.count("hellhell"), 2);
        assert_eq!(vocab.count(""), 0);
        assert_eq!(vocab.count("a"), 1);
        // Multi-byte characters without merges count their bytes.
        assert_eq!(vocab.count("中"), 3);
    }

    /// tiktoken's `_byte_pair_merge` (src/lib.rs), ported as is: the
    /// reference both merge loops must agree with.
    fn reference_merge_count(vocab: &Vocabulary, piece: &[u8]) -> usize {
        let mut parts: Vec<(usize, u32)> = (0..piece.len() - 1)
            .map(|i| (i, vocab.rank(&piece[i..i + 2])))
            .collect();
        parts.push((piece.len() - 1, NO_RANK));
        parts.push((piece.len(), NO_RANK));
        let get_rank = |parts: &Vec<(usize, u32)>, i: usize| {
            if i + 3 < parts.len() {
                vocab.rank(&piece[parts[i].0..parts[i + 3].0])
            } else {
                NO_RANK
            }
        };
        loop {
            let (i, &(_, min)) = parts[..parts.len() - 1]
                .iter()
                .enumerate()
                .min_by_key(|&(i, &(_, rank))| (rank, i))
                .unwrap();
            if min == NO_RANK {
                break;
            }
            if i > 0 {
                parts[i - 1].1 = get_rank(&parts, i - 1);
            }
            parts[i].1 = get_rank(&parts, i);
            parts.remove(i + 1);
        }
        parts.len() - 1
    }

    #[test]
    fn merges_equal_tiktoken_reference() {
        let vocab = tiny_vocab(&[
            "ab",
            "bc",
            "abc",
            "ca",
            "aa",
            "aaaa",
            "cab",
            "bca",
            "abcab",
            "ba",
            "aab",
            "bcabcabca",
            "abcabcabcabcabca",
        ]);
        let mut rng = Rng(12345);
        let mut scratch = Scratch::default();
        for _ in 0..3000 {
            let len = 3 + (rng.next() % 200) as usize;
            let piece: Vec<u8> = (0..len)
                .map(|_| b"abc"[(rng.next() % 3) as usize])
                .collect();
            let expected = reference_merge_count(&vocab, &piece);
            assert_eq!(
                vocab.merge_heap(&piece, len, &mut scratch),
                expected,
                "{piece:?}"
            );
            if len <= SMALL_PIECE {
                assert_eq!(vocab.merge_small(&piece, len), expected, "{piece:?}");
            }
            // With the window running past the piece, as `count` passes it.
            let mut window = piece.clone();
            window.extend_from_slice(b"abcabcabcabcabcabc");
            assert_eq!(
                vocab.merge_heap(&window, len, &mut scratch),
                expected,
                "{piece:?}"
            );
            if len <= SMALL_PIECE {
                assert_eq!(vocab.merge_small(&window, len), expected, "{piece:?}");
            }
        }
    }

    #[test]
    fn fast_lines_read_as_the_general_path_does() {
        let engine = base64::engine::general_purpose::STANDARD;
        let mut rng = Rng(0xDEAD_BEEF);
        let mut buf = [0u8; 96];
        for len in 1..=72 {
            for _ in 0..20 {
                let token: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                let rank = (rng.next() % 1_000_000_000) as u32;
                let line = format!("{} {rank}", engine.encode(&token));
                let (n, r, word) = fast_line(line.as_bytes(), &mut buf).expect(&line);
                assert_eq!((n, r), (len, rank), "{line}");
                let got = if n <= PACKED_MAX {
                    word.to_le_bytes()[..n].to_vec()
                } else {
                    buf[..n].to_vec()
                };
                assert_eq!(got, token, "{line}");
            }
        }
        // Anything else goes to the general path (which accepts or words an error).
        for line in [
            "YR== 1",
            "YQ= 1",
            "Y=== 1",
            "YQ==YQ== 1",
            "YWJ= 1",
            " YQ== 1",
            "YQ==  1",
            "YQ== 1\r",
            "YQ== 1234567890",
            "YQ== -1",
            "YQ== ",
            "YQ==",
            "",
            "Y!== 1",
        ] {
            assert_eq!(fast_line(line.as_bytes(), &mut buf), None, "{line:?}");
        }
        // Both paths build the same vocabulary.
        let vocab = Vocabulary::from_tiktoken_bytes(b"YQ== 0\r\n  Yg== 1\nYWI=\t2\n").unwrap();
        assert_eq!(vocab.count("ab"), 1);
        assert_eq!(vocab.len(), 3);
    }

    #[test]
    fn short_tokens_are_told_apart_by_length_and_every_byte() {
        let zeros = "\0".repeat(15);
        let fifteen = "abcdefghijklmno";
        let sixteen = "abcdefghijklmnop";
        let vocab = tiny_vocab(&[
            "a\0",
            "\0\0",
            &zeros,
            fifteen,
            sixteen,
            "ab",
            "abcdefghijk",
            "abcdefghijkl",
            "abcdefghij\0",
        ]);
        let rank = |s: &str| vocab.rank(s.as_bytes());
        assert_eq!(rank("\0"), 0);
        assert_eq!(rank("a"), 97);
        assert_eq!(rank("a\0"), 256);
        assert_eq!(rank("\0\0"), 257);
        assert_eq!(rank(&zeros), 258);
        assert_eq!(rank(fifteen), 259);
        assert_eq!(rank(sixteen), 260);
        assert_eq!(rank("ab"), 261);
        assert_eq!(rank("abcdefghijk"), 262);
        assert_eq!(rank("abcdefghijkl"), 263);
        assert_eq!(rank("abcdefghij\0"), 264);
        assert_eq!(rank("abcdefghij"), NO_RANK);
        assert_eq!(rank("abcdefghij\0\0"), NO_RANK);
        for absent in [
            "a\0\0",
            "\0\0\0",
            "\0a",
            "abcdefghijklmn",
            "ba",
            "abcdefghijklmnq",
        ] {
            assert_eq!(rank(absent), NO_RANK, "{absent:?}");
        }
        // Through the 16-byte window reads of counting, too.
        assert_eq!(vocab.count(sixteen), 1);
        assert_eq!(vocab.count(fifteen), 1);
        assert_eq!(vocab.count("ab ab"), 3);
    }

    #[test]
    fn specials_count_one_token_each() {
        let vocab = tiny_vocab(&[]);
        assert_eq!(vocab.count("<|im_start|>"), 12);
        assert_eq!(vocab.count_with_specials("<|im_start|>"), 1);
        assert_eq!(vocab.count_with_specials("a<|im_end|>b<|extra_204|>"), 4);
        // Not specials: unknown names, leading zeros, out of range, unclosed.
        for text in [
            "<|extra_205|>",
            "<|extra_01|>",
            "<|im_start",
            "<|foo|>",
            "<<|",
        ] {
            assert_eq!(vocab.count_with_specials(text), vocab.count(text), "{text}");
        }
        assert_eq!(special_len(b"<|extra_0|>x"), Some(11));
        assert_eq!(special_len(b"<|endoftext|>"), Some(13));
    }

    #[test]
    fn bound_without_vocabulary_is_utf8_length_with_framing() {
        assert_eq!(text_bound(None, "héllo 中"), 10);
        // U+1D160 decomposes under NFC into three 4-byte characters.
        assert_eq!(text_bound(None, "\u{1d160}"), 12);
        let messages = [
            ChatMessage {
                role: "user",
                content: "hi",
            },
            ChatMessage {
                role: "assistant",
                content: "",
            },
        ];
        assert_eq!(chat_bound(None, &messages), 2 * 5 + 2 + 3 + 21);
        let with_system = [
            ChatMessage {
                role: "system",
                content: "be brief",
            },
            ChatMessage {
                role: "user",
                content: "hi",
            },
        ];
        assert_eq!(chat_bound(None, &with_system), 2 * 5 + 8 + 2 + 3);
        assert_eq!(chat_bound(None, &[]), REPLY_PRIMER + DEFAULT_SYSTEM);
    }

    #[test]
    fn bound_takes_the_larger_of_raw_and_nfc() {
        let vocab = tiny_vocab(&[]);
        // "e" + U+0301 (3 bytes) composes to "é" (2 bytes): the raw count wins.
        assert_eq!(text_bound(Some(&vocab), "e\u{301}"), 3);
        // U+0958 (3 bytes) decomposes to U+0915 U+093C (6 bytes): NFC wins.
        assert_eq!(text_bound(Some(&vocab), "\u{958}"), 6);
    }

    #[test]
    fn surely_nfc_ranges_need_no_normalization() {
        for &(first, last) in SURELY_NFC {
            for c in (first..=last).filter_map(char::from_u32) {
                assert_eq!(is_nfc_quick(std::iter::once(c)), IsNormalized::Yes, "{c:?}");
                assert_eq!(unicode_normalization::char::canonical_combining_class(c), 0);
            }
        }
        assert!(surely_nfc("Grüße, 世界！ カタカナ 한국어 “quotes”"));
        assert!(!surely_nfc("e\u{301}"));
        assert!(!surely_nfc("\u{212b}"));
    }

    #[test]
    fn dashscope_chunks_split_long_text_at_newlines() {
        let line = "x".repeat(60_000);
        let text = format!("{line}\n{line}\n{line}");
        let chunks = dashscope_chunks(&text);
        assert_eq!(chunks.len(), 3);
        assert_eq!(chunks.concat(), text);
        assert!(chunks[1].starts_with('\n'));
        let long_line = "é".repeat(250_000);
        let chunks = dashscope_chunks(&long_line);
        assert_eq!(
            chunks.iter().map(|c| c.chars().count()).collect::<Vec<_>>(),
            [100_000, 100_000, 50_000]
        );
        assert_eq!(dashscope_chunks("short"), ["short"]);
    }

    #[test]
    fn malformed_files_name_the_line() {
        let error = Vocabulary::from_tiktoken_bytes(b"YQ== 0\n\nYg== x\n").unwrap_err();
        assert_eq!(
            error.to_string(),
            "malformed Qwen vocabulary, line 3: bad rank \"x\""
        );
        let error = Vocabulary::from_tiktoken_bytes(b"YQ== 0\n!!! 1\n").unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("malformed Qwen vocabulary, line 2: bad base64 token \"!!!\""),
            "{error}"
        );
        let error = Vocabulary::from_tiktoken_bytes(b"YQ== 0 1\n").unwrap_err();
        assert!(error.to_string().contains("line 1: expected"), "{error}");
        let error = Vocabulary::from_tiktoken_bytes(b"YQ== 0\nYQ== 1\n").unwrap_err();
        assert!(
            error
                .to_string()
                .contains("line 2: duplicate token \"YQ==\" (ranks 0 and 1)"),
            "{error}"
        );
        let error = Vocabulary::from_tiktoken_bytes(b"YQ== 0\nYg== 0\n").unwrap_err();
        assert!(
            error
                .to_string()
                .ends_with("line 2: rank 0 already given on line 1"),
            "{error}"
        );
        // Ranks out of order are fine, a rank given twice is not, wherever it comes.
        let vocab = Vocabulary::from_tiktoken_bytes(b"YQ== 5\n\nYg== 3\nYw== 4\n").unwrap();
        assert_eq!(vocab.len(), 3);
        let error =
            Vocabulary::from_tiktoken_bytes(b"YQ== 5\n\nYg== 3\nYw== 4\nZA== 5\n").unwrap_err();
        assert!(
            error
                .to_string()
                .ends_with("line 5: rank 5 already given on line 1"),
            "{error}"
        );
        let error = Vocabulary::from_tiktoken_bytes(b"\n\n").unwrap_err();
        assert_eq!(error.to_string(), "Qwen vocabulary holds no tokens");
        // CRLF line ends are accepted.
        assert_eq!(
            Vocabulary::from_tiktoken_bytes(b"YQ== 0\r\nYg== 1\r\n")
                .unwrap()
                .len(),
            2
        );
    }

    #[test]
    fn load_errors_name_the_file() {
        let dir = std::env::temp_dir().join(format!("quotaguard-tokens-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let missing = dir.join("missing.tiktoken");
        let error = Vocabulary::load(&missing).unwrap_err();
        assert!(matches!(error, TokenError::Read { .. }));
        assert!(error.to_string().contains("missing.tiktoken"), "{error}");
        let bad = dir.join("bad.tiktoken");
        std::fs::write(&bad, b"YQ== 0\nnot-a-line\n").unwrap();
        let error = Vocabulary::load(&bad).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("bad.tiktoken\", line 2: expected"),
            "{error}"
        );
        let good = dir.join("good.tiktoken");
        std::fs::write(&good, b"YQ== 0\nYg== 1\n").unwrap();
        let first = cached_vocabulary(&good).unwrap();
        let second = cached_vocabulary(&good).unwrap();
        assert!(Arc::ptr_eq(&first, &second));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn vocabulary_is_send_and_sync() {
        fn assert_send_sync<T: Send + Sync>() {}
        assert_send_sync::<Vocabulary>();
        assert_send_sync::<TokenError>();
    }

    /// The real Qwen vocabulary, which `QWEN_TIKTOKEN` must name. The tests that need it
    /// are ignored by a plain `cargo test` (and say so); `.ci/run` runs them with
    /// `--include-ignored`, where a missing vocabulary fails them.
    fn qwen() -> Arc<Vocabulary> {
        let path = std::env::var_os("QWEN_TIKTOKEN").expect(
            "QWEN_TIKTOKEN must name the Qwen vocabulary (dashscope's resources/qwen.tiktoken)",
        );
        cached_vocabulary(Path::new(&path)).expect("QWEN_TIKTOKEN names a valid vocabulary")
    }

    /// Expected counts produced once with tiktoken 0.14.0 and dashscope's
    /// `qwen.tiktoken`:
    ///   tok = dashscope.get_tokenizer("qwen-7b-chat"); enc = tok._tokenizer
    ///   (len(enc.encode_ordinary(s)), len(enc.encode(s, allowed_special="all")),
    ///    len(tok.encode(s)))
    const QWEN_CASES: &[(&str, u64, u64, u64)] = &[
        (
            "Hello, world! This is a test of the Qwen tokenizer.",
            14,
            14,
            14,
        ),
        ("通义千问是阿里云研发的大语言模型。", 12, 12, 12),
        ("Mixed 中文 and English, 数字123和emoji 😀👍🏽!", 17, 17, 17),
        (
            "fn main() {\n    let x = vec![1, 2, 3];\n    println!(\"{:?}\", x);\n}\n",
            26,
            26,
            26,
        ),
        (
            "a  b   c\t\td \u{3000}e  \n\n  \r\n\r\n   end   ",
            15,
            15,
            15,
        ),
        ("line1\nline2\n\n\nline3\r\n", 9, 9, 9),
        (
            "I'LL say it's fine, you'RE right, we'Ve 'd 'M 'T 'ſ 'sa",
            25,
            25,
            25,
        ),
        ("12345 and 3.14159 or ١٢٣ Ⅻ ½", 27, 27, 27),
        ("<|im_start|>user\nhi<|im_end|>", 15, 5, 5),
        ("", 0, 0, 0),
    ];

    #[test]
    #[ignore = "needs QWEN_TIKTOKEN (the Qwen vocabulary); .ci/run runs it"]
    fn qwen_counts_equal_tiktoken() {
        let vocab = qwen();
        assert_eq!(vocab.len(), 151_643);
        for &(text, ordinary, specials, dashscope) in QWEN_CASES {
            assert_eq!(vocab.count(text), ordinary, "{text:?}");
            assert_eq!(vocab.count_with_specials(text), specials, "{text:?}");
            let bound = text_bound(Some(&vocab), text);
            assert!(bound >= dashscope && bound >= ordinary, "{text:?}");
            assert_eq!(bound, ordinary.max(dashscope), "{text:?}");
        }
    }

    #[test]
    #[ignore = "needs QWEN_TIKTOKEN (the Qwen vocabulary); .ci/run runs it"]
    fn qwen_character_merges_equal_tiktokens() {
        let vocab = qwen();
        let alphabet: Vec<char> = concat!(
            "的一是在不了有和人这中大为上个国我以要他时来用们生到作地于出就分对成会可主发",
            "年动同工也能下过子说产种面而方后多定行学法所民得经十三之进着等部度家电力里如",
            "水化高自二理起小物现实加量都两体制机当使点从业本去把性好应开它合还因由其些然",
            "龘鬱齉éèàüößñçåøабвгдежзийклмнопрстуфхцчшщыэюяαβγδεζ가나다라마바사ひらがなカタ",
            "ナ，。、；：！？·—…“” abcxyzAZ019'\t\n😀👍🏽\u{10400}",
        )
        .chars()
        .collect();
        let mut rng = Rng(0x5151_7E57);
        let mut scratch = Scratch::default();
        for _ in 0..20_000 {
            let len = 2 + rng.next() % 30;
            let text: String = (0..len)
                .map(|_| alphabet[(rng.next() % alphabet.len() as u64) as usize])
                .collect();
            let bytes = text.as_bytes();
            let parts = vocab.merge_chars(bytes, bytes.len(), &mut scratch);
            assert_eq!(parts, reference_merge_count(&vocab, bytes), "{text:?}");
        }
    }

    /// Text made of the vocabulary's own words (its tokens of two to four CJK or
    /// kana characters), so that whole characters merge, often in competing ways:
    /// `merge_chars` (and the linear scan it tries first) against the reference.
    #[test]
    #[ignore = "needs QWEN_TIKTOKEN (the Qwen vocabulary); .ci/run runs it"]
    fn qwen_word_merges_equal_tiktokens() {
        let vocab = qwen();
        let path = std::env::var_os("QWEN_TIKTOKEN").expect("QWEN_TIKTOKEN");
        let data = std::fs::read(path).expect("the vocabulary reads");
        let engine = base64::engine::general_purpose::STANDARD;
        let words: Vec<String> = data
            .split(|&b| b == b'\n')
            .filter_map(|line| line.split(|&b| b == b' ').next())
            .filter_map(|token| engine.decode(token).ok())
            .filter_map(|bytes| String::from_utf8(bytes).ok())
            .filter(|word| {
                (2..=4).contains(&word.chars().count())
                    && word.chars().all(|c| ('\u{3040}'..='\u{9FFF}').contains(&c))
            })
            .collect();
        assert!(words.len() > 1000, "{} words", words.len());
        let mut rng = Rng(0x7E57_C4A5);
        let mut scratch = Scratch::default();
        let (mut scanned, mut merged) = (0, 0);
        for _ in 0..20_000 {
            let mut text = String::new();
            for _ in 0..1 + rng.next() % 12 {
                let word = &words[(rng.next() % words.len() as u64) as usize];
                // Whole words, or a word's tail then another's head, to make merges
                // that compete across word boundaries.
                match rng.next() % 3 {
                    0 => text.extend(word.chars().skip(1)),
                    1 => text.extend(word.chars().take(1)),
                    _ => text.push_str(word),
                }
            }
            let bytes = text.as_bytes();
            let n = bytes.len();
            if n < 5 {
                continue;
            }
            let expected = reference_merge_count(&vocab, bytes);
            assert_eq!(
                vocab.merge_chars(bytes, n, &mut scratch),
                expected,
                "{text:?}"
            );
            let mut chars = Vec::new();
            vocab.char_parts(bytes, n, &mut chars);
            if chars.len() <= CHAR_SCAN_MAX && chars.iter().all(|&(_, d)| d != NO_RANK) {
                if let Some(parts) = vocab.merge_whole_chars(bytes, n, &chars) {
                    assert_eq!(parts, expected, "{text:?}");
                    scanned += 1;
                    merged += usize::from(parts < chars.len());
                }
            }
        }
        // The linear scan answers most of these pieces, merges made included.
        assert!(
            scanned > 10_000 && merged > 5_000,
            "{scanned} scanned, {merged} merged"
        );
    }

    #[test]
    #[ignore = "needs QWEN_TIKTOKEN (the Qwen vocabulary); .ci/run runs it"]
    fn qwen_chat_bound_is_framing_plus_counts() {
        let vocab = qwen();
        let messages = [
            ChatMessage {
                role: "user",
                content: QWEN_CASES[0].0,
            },
            ChatMessage {
                role: "assistant",
                content: QWEN_CASES[1].0,
            },
        ];
        assert_eq!(
            chat_bound(Some(&vocab), &messages),
            5 + 14 + 5 + 12 + 3 + 21
        );
    }
}
