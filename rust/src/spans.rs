//! Byte spans of tokens in their text, from the character offsets tokenizers report, and byte spans
//! carried between two renderings of one text.
//!
//! Tokenizers report where each token starts in characters (code points). Byte-level tokenizers split a
//! multi-byte character across tokens that then share one character offset, so character offsets cannot
//! say which of those tokens holds which byte. Here every token gets an exact byte span, following the
//! token's own bytes through the text wherever they spell it (`byte_spans`). The rules are those of
//! `fusekit/align/spans.py`, which stays as the slow, readable reference the tests compare against.
//!
//! `remap_spans` carries spans from one text into another through the byte blocks both share, as
//! Python's `difflib.SequenceMatcher(None, a, b, autojunk=False).get_matching_blocks()` finds them
//! (`matching_blocks` follows that algorithm step for step, so the blocks, and the spans, are the same).

#[derive(Debug, PartialEq, Eq)]
pub struct SpanError(pub String);

impl std::fmt::Display for SpanError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// The byte offset of every character of `text` (UTF-8, lone surrogates encoded as three bytes the way
/// Python's "surrogatepass" writes them) and of its end: [characters + 1]. A character starts at every
/// byte that is not a continuation byte (0x80..=0xBF).
pub fn char_to_byte(text: &[u8]) -> Vec<usize> {
    let mut out: Vec<usize> = Vec::with_capacity(text.len() + 1);
    out.extend(text.iter().enumerate().filter(|(_, &b)| !(0x80..=0xBF).contains(&b)).map(|(i, _)| i));
    out.push(text.len());
    out
}

/// Python's `bytes.lstrip()`: the leading ASCII whitespace (space, \t, \n, \r, \x0b, \x0c) removed.
fn lstrip(b: &[u8]) -> &[u8] {
    let n = b.iter().take_while(|c| matches!(c, b' ' | b'\t' | b'\n' | b'\r' | 0x0b | 0x0c)).count();
    &b[n..]
}

/// Python's `data.startswith(prefix, at)`: false when `at` lies past the end, even for an empty prefix.
fn starts_with_at(data: &[u8], prefix: &[u8], at: usize) -> bool {
    at <= data.len() && data[at..].starts_with(prefix)
}

/// (start, end) byte offsets of each token of `text`.
///
/// `starts[i]`: token i's start in characters, non-decreasing (a token may start at the end of the text: an
/// appended end-of-sequence token, whose span is empty). `tokens[i]`: token i's own bytes (its vocabulary
/// entry; empty for special tokens). Where the tokens spell the text byte for byte (byte-level BPE), the
/// spans follow the bytes, so the pieces of a split character each get their own bytes; elsewhere (a
/// normaliser, SentencePiece's dummy-prefix space, dropped characters) a token spans from its character
/// start to the next token's start. Errors on offsets outside the text or out of order.
pub fn byte_spans(text: &[u8], starts: &[i64], tokens: &[&[u8]]) -> Result<Vec<(usize, usize)>, SpanError> {
    let n = starts.len();
    if tokens.len() != n {
        return Err(SpanError(format!("{} token start offsets for {} tokens", n, tokens.len())));
    }
    if n == 0 {
        return Ok(Vec::new());
    }
    let c2b = char_to_byte(text);
    let chars = c2b.len() - 1;
    if starts.iter().any(|&s| s < 0 || s as usize > chars) || starts.windows(2).any(|w| w[1] < w[0]) {
        return Err(SpanError(format!(
            "token offsets must be non-decreasing character offsets within the text of {chars} characters"
        )));
    }
    let at_char = |i: usize| c2b[starts[i] as usize];
    let first = at_char(0);
    let total: usize = tokens.iter().map(|t| t.len()).sum();
    // Offsets may leave out a token's leading whitespace (trim_offsets): start where the bytes spell the text.
    let lead = tokens[0].len() - lstrip(tokens[0]).len();
    let mut candidates = vec![first];
    if lead > 0 && first >= lead {
        candidates.push(first - lead);
    }
    for at in candidates {
        if at + total <= text.len() && spells(text, at, tokens) {
            let mut spans = Vec::with_capacity(n);
            let mut pos = at;
            for t in tokens {
                spans.push((pos, pos + t.len()));
                pos += t.len();
            }
            // Tokens without bytes (special tokens) sit empty at their own start.
            for (i, t) in tokens.iter().enumerate() {
                if t.is_empty() {
                    let s = at_char(i).max(spans[i].0);
                    spans[i] = (s, s);
                }
            }
            return Ok(spans);
        }
    }
    Ok(walk(text, &c2b, starts, tokens))
}

/// Whether the tokens, one after another, spell `text` from byte `at`.
fn spells(text: &[u8], at: usize, tokens: &[&[u8]]) -> bool {
    let mut pos = at;
    for t in tokens {
        if !starts_with_at(text, t, pos) {
            return false;
        }
        pos += t.len();
    }
    true
}

/// Token by token: each token where its bytes (or, for SentencePiece's dummy-prefix space, its bytes
/// after that space) spell the text at the cursor, else past characters the tokenizer dropped; a token
/// found nowhere spans from its character start to the next token's start (normalised text).
fn walk(text: &[u8], c2b: &[usize], starts: &[i64], tokens: &[&[u8]]) -> Vec<(usize, usize)> {
    let n = starts.len();
    let mut spans = vec![(0usize, 0usize); n];
    let mut open_end = vec![false; n];
    let mut cursor = c2b[starts[0] as usize];
    for i in 0..n {
        let char_at = c2b[starts[i] as usize];
        let tb = tokens[i];
        let mut placed = None;
        let positions = [cursor, cursor.max(char_at)];
        let tried = if positions[0] == positions[1] { &positions[..1] } else { &positions[..] };
        for &pos in tried {
            if !tb.is_empty() && starts_with_at(text, tb, pos) {
                placed = Some((pos, pos + tb.len()));
            } else if tb.len() > 1 && tb[0] == b' ' && starts_with_at(text, &tb[1..], pos) {
                placed = Some((pos, pos + tb.len() - 1));
            }
            if placed.is_some() {
                break;
            }
        }
        spans[i] = placed.unwrap_or_else(|| {
            let pos = cursor.max(char_at);
            open_end[i] = !tb.is_empty();
            (pos, pos)
        });
        cursor = spans[i].1;
    }
    for i in 0..n {
        if open_end[i] {
            let next = if i + 1 < n { spans[i + 1].0 } else { text.len() };
            spans[i].1 = spans[i].0.max(next);
        }
    }
    spans
}

/// One block both sequences share: a[a..a + size] == b[b..b + size].
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Block {
    pub a: usize,
    pub b: usize,
    pub size: usize,
}

/// The longest-match search of `difflib.SequenceMatcher` (no junk, no "popular" elements), over bytes.
struct Matcher<'a> {
    a: &'a [u8],
    b: &'a [u8],
    /// Positions of each byte value in `b`, ascending.
    b2j: Vec<Vec<u32>>,
    /// Run lengths ending at b position j for the previous and the current row of `a`, valid where the
    /// stamp matches the row (two buffers, swapped per row: no map to clear).
    len: [Vec<u32>; 2],
    stamp: [Vec<u64>; 2],
    row: u64,
}

impl<'a> Matcher<'a> {
    fn new(a: &'a [u8], b: &'a [u8]) -> Self {
        let mut b2j = vec![Vec::new(); 256];
        for (j, &c) in b.iter().enumerate() {
            b2j[c as usize].push(j as u32);
        }
        let lb = b.len();
        Matcher { a, b, b2j, len: [vec![0; lb], vec![0; lb]], stamp: [vec![0; lb], vec![0; lb]], row: 0 }
    }

    /// `find_longest_match(alo, ahi, blo, bhi)`: the longest block inside the ranges, the earliest in a
    /// (then in b) among the longest.
    fn longest(&mut self, alo: usize, ahi: usize, blo: usize, bhi: usize) -> Block {
        let (mut besti, mut bestj, mut bestsize) = (alo, blo, 0usize);
        for i in alo..ahi {
            self.row += 1;
            let (cur, prev) = if self.row % 2 == 0 { (0, 1) } else { (1, 0) };
            let js = &self.b2j[self.a[i] as usize];
            let from = js.partition_point(|&j| (j as usize) < blo);
            for &j in &js[from..] {
                let j = j as usize;
                if j >= bhi {
                    break;
                }
                let before = if j > 0 && self.stamp[prev][j - 1] == self.row - 1 { self.len[prev][j - 1] as usize } else { 0 };
                let k = before + 1;
                self.len[cur][j] = k as u32;
                self.stamp[cur][j] = self.row;
                if k > bestsize {
                    (besti, bestj, bestsize) = (i + 1 - k, j + 1 - k, k);
                }
            }
        }
        // difflib then extends the match over equal elements on both sides (a no-op without junk, kept
        // so that the result is difflib's by construction).
        let (a, b) = (self.a, self.b);
        while besti > alo && bestj > blo && a[besti - 1] == b[bestj - 1] {
            besti -= 1;
            bestj -= 1;
            bestsize += 1;
        }
        while besti + bestsize < ahi && bestj + bestsize < bhi && a[besti + bestsize] == b[bestj + bestsize] {
            bestsize += 1;
        }
        // Rows of the next search must not see this one's runs.
        self.row += 1;
        Block { a: besti, b: bestj, size: bestsize }
    }
}

/// `SequenceMatcher(None, a, b, autojunk=False).get_matching_blocks()` without the final empty block:
/// the blocks a and b share, in order, adjacent blocks merged.
pub fn matching_blocks(a: &[u8], b: &[u8]) -> Vec<Block> {
    let mut m = Matcher::new(a, b);
    let mut queue = vec![(0usize, a.len(), 0usize, b.len())];
    let mut blocks = Vec::new();
    while let Some((alo, ahi, blo, bhi)) = queue.pop() {
        let x = m.longest(alo, ahi, blo, bhi);
        if x.size > 0 {
            blocks.push(x);
            if alo < x.a && blo < x.b {
                queue.push((alo, x.a, blo, x.b));
            }
            if x.a + x.size < ahi && x.b + x.size < bhi {
                queue.push((x.a + x.size, ahi, x.b + x.size, bhi));
            }
        }
    }
    blocks.sort();
    let mut merged: Vec<Block> = Vec::with_capacity(blocks.len());
    for x in blocks {
        match merged.last_mut() {
            Some(last) if last.a + last.size == x.a && last.b + last.size == x.b => last.size += x.size,
            _ => merged.push(x),
        }
    }
    merged
}

/// Source byte `spans` (in `src_text`) as byte spans in `tgt_text`, through the blocks the two texts
/// share (`matching_blocks`). A span inside one block moves with it; any other (template markup, a token
/// straddling content and markup) gets an empty span at the mapped end of the token before it, so spans
/// stay non-decreasing and no target position is aligned to template tokens.
pub fn remap_spans(src_text: &[u8], tgt_text: &[u8], spans: &[(usize, usize)]) -> Vec<(usize, usize)> {
    if src_text == tgt_text {
        return spans.to_vec();
    }
    let blocks = matching_blocks(src_text, tgt_text);
    let mut out = Vec::with_capacity(spans.len());
    let (mut last, mut bi) = (0usize, 0usize);
    for &(s, e) in spans {
        while bi < blocks.len() && blocks[bi].a + blocks[bi].size <= s && !(e == s && s == blocks[bi].a + blocks[bi].size) {
            bi += 1;
        }
        let mapped = blocks.get(bi).filter(|x| x.a <= s && e <= x.a + x.size && e > s).map(|x| (s - x.a + x.b, e - x.a + x.b));
        match mapped {
            Some(m) => {
                out.push(m);
                last = m.1;
            }
            None => out.push((last, last)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spans_of(text: &str, starts: &[i64], tokens: &[&str]) -> Vec<(usize, usize)> {
        let t: Vec<&[u8]> = tokens.iter().map(|s| s.as_bytes()).collect();
        byte_spans(text.as_bytes(), starts, &t).unwrap()
    }

    #[test]
    fn characters_map_to_their_first_byte() {
        assert_eq!(char_to_byte("aé東😀".as_bytes()), vec![0, 1, 3, 6, 10]);
        // A lone surrogate as Python's surrogatepass writes it: three bytes, one character.
        assert_eq!(char_to_byte(&[b'a', 0xED, 0xA0, 0x80, b'b']), vec![0, 1, 4, 5]);
    }

    #[test]
    fn split_characters_follow_their_own_bytes() {
        // "東" split into two byte-level pieces that share one character offset.
        let text = "a東";
        let tokens: [&[u8]; 3] = [b"a", &[0xE6, 0x9D], &[0xB1]];
        assert_eq!(byte_spans(text.as_bytes(), &[0, 1, 1], &tokens).unwrap(), vec![(0, 1), (1, 3), (3, 4)]);
    }

    #[test]
    fn dummy_prefix_trimmed_offsets_and_normalised_text() {
        // SentencePiece: "▁Hi" spelled " Hi" by its bytes, the text has no leading space.
        assert_eq!(spans_of("Hi yo", &[0, 2], &[" Hi", " yo"]), vec![(0, 2), (2, 5)]);
        // Offsets that leave out the leading space of " yo" (trim_offsets).
        assert_eq!(spans_of("a yo", &[0, 2], &["a", " yo"]), vec![(0, 1), (1, 4)]);
        // A token whose bytes are nowhere (a normaliser rewrote the text) spans to the next token.
        assert_eq!(spans_of("café x", &[0, 5], &["cafe", " x"]), vec![(0, 6), (6, 7)]);
        // A special token at the end sits empty there.
        assert_eq!(spans_of("ab", &[0, 2], &["ab", ""]), vec![(0, 2), (2, 2)]);
    }

    #[test]
    fn bad_offsets_are_errors() {
        let t: [&[u8]; 2] = [b"a", b"b"];
        assert!(byte_spans(b"ab", &[1, 0], &t).is_err());
        assert!(byte_spans(b"ab", &[0, 3], &t).is_err());
        assert!(byte_spans(b"ab", &[-1, 0], &t).is_err());
    }

    #[test]
    fn matching_blocks_as_difflib_finds_them() {
        // difflib.SequenceMatcher(None, b"abxcd", b"abcd", autojunk=False).get_matching_blocks()
        // == [Match(a=0, b=0, size=2), Match(a=3, b=2, size=2), Match(a=5, b=4, size=0)]
        assert_eq!(matching_blocks(b"abxcd", b"abcd"), vec![Block { a: 0, b: 0, size: 2 }, Block { a: 3, b: 2, size: 2 }]);
        // [Match(a=1, b=0, size=3), Match(a=4, b=4, size=0)]: "bcd" is the longest, then nothing is left.
        assert_eq!(matching_blocks(b"abcd", b"bcdx"), vec![Block { a: 1, b: 0, size: 3 }]);
        assert!(matching_blocks(b"", b"ab").is_empty());
    }

    #[test]
    fn spans_move_with_their_block_and_markup_gets_empty_spans() {
        let src = b"<s>hello world</s>";
        let tgt = b"[U] hello world";
        let spans = [(0, 3), (3, 8), (8, 14), (14, 18)];
        assert_eq!(remap_spans(src, tgt, &spans), vec![(0, 0), (4, 9), (9, 15), (15, 15)]);
    }
}
