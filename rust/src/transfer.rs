//! Byte-span transfer of a source model's next-token distributions onto a target tokenizer's positions.
//!
//! Both tokenizations are of the same text, each token given by its byte span in it. Target row j predicts
//! target token j+1, which starts at byte b and ends at byte e. The row is built from the source's view of
//! the text at b:
//!
//! * **Start.** Let u be the source token whose span holds byte b (so row u−1 of the source predicts it).
//!   The bytes of u before b are already emitted ("need"): only source candidates whose bytes start with
//!   them — and go past b — are consistent, and their probabilities are renormalised over the consistent
//!   top-k mass (the conditional continuation given the pieces already emitted). When b is a source
//!   boundary there is nothing to condition on and the probabilities are used as they are.
//! * **Pieces.** A candidate's continuation from b is the rest of its bytes. The true source token (the
//!   text's own next source token, known by id) continues as the text does, so its mass goes to the true
//!   target token j+1 whenever the source token reaches e (1:1 and 1:n). When it ends before e (n:1), the
//!   chain rule follows the source's next positions: its mass is multiplied by the next row's candidates,
//!   again to e. Any other candidate gives its mass to the first target piece of its continuation: the
//!   longest target token that is a prefix of it (text already passed from b counts, so a candidate deep
//!   in a chain competes with the true target token on the same bytes).
//! * **Roles.** Special tokens never match by string. The two *end* roles map across vocabularies: the
//!   source's end of turn (a chat template's `<|im_end|>`, `<|eot_id|>`) to the target's end of turn, its end
//!   of sequence to the target's end of sequence (each falling back on the other where a vocabulary has only
//!   one), only where a target token may start (at a source boundary, depth 0). Where the target's text ends
//!   (a turn or the document: its true next token is an end id without bytes), the row starts from the
//!   first source end token placed between the last source text before that point and the point itself,
//!   and every source end candidate there counts for the target's end token. Any other special or empty
//!   (padded) source id is dropped; the target lookup never offers special, empty or byte-fallback
//!   twin ids (`<0x2C>` when `,` exists), so no mass lands on ids the tokenizer would not emit.
//!
//! Rows are the aggregated mass per target id, highest first (ties: lower id), truncated to `out_k` and
//! renormalised; `true_mass` keeps the unnormalised probability of the target's true next token (the
//! source's probability of the same event the target's CE scores), and `kept_mass` the row's whole
//! unnormalised mass after truncation (what the renormalisation divided by: the source's probability of
//! the kept target pieces, so probs · kept_mass is the row as transferred), both NaN where nothing
//! transferred. A row
//! with no transferred mass falls back to one-hot on the next target token, as in FuseLLM. The last row
//! (no next token) is empty. When both tokenizers are the same, every row is the source's own row, with
//! only twins and special ids merged as above. This is the tokenizer-transfer view of the distribution:
//! the chain rule over byte-aligned pieces (cf. "exact byte-level probabilities from tokenized LMs",
//! Phan et al. 2024, and approximate likelihood matching, Minixhofer et al. 2025), restricted to the
//! paths a top-k along the true text can score.

use std::collections::HashMap;

use rayon::prelude::*;

use crate::trie::Trie;

/// Deepest chain followed for one target token (source tokens it may cover); deeper mass goes to prefixes.
pub const MAX_DEPTH: usize = 64;

/// A target vocabulary as byte strings, with the id preferred for every string that can be emitted.
pub struct TargetVocab {
    /// Every id's bytes (empty for special and padded ids): what byte spans follow.
    pub tokens: Vec<Vec<u8>>,
    /// The preferred id of every emittable byte string.
    lookup: Trie,
    pub size: usize,
    pub ends: Ends,
}

/// The ids that end a document (`eos`) and a chat turn (`eot`, from the chat template; may equal `eos`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Ends {
    pub eos: Option<u32>,
    pub eot: Option<u32>,
}

impl Ends {
    pub fn contains(&self, id: u32) -> bool {
        self.eos == Some(id) || self.eot == Some(id)
    }

    /// The target id that takes a source end token's mass by role: end of turn to end of turn, end of
    /// sequence to end of sequence, each falling back on the other role.
    fn by_role(&self, src: &Ends, id: u32) -> Option<u32> {
        if src.eot == Some(id) {
            self.eot.or(self.eos)
        } else if src.eos == Some(id) {
            self.eos.or(self.eot)
        } else {
            None
        }
    }
}

impl TargetVocab {
    /// `tokens[id]` is the byte string of id; `rank[id]` its preference among ids with the same bytes
    /// (lower wins; ties to the lower id); `usable[id]` false for special, empty and unemittable ids.
    pub fn new(tokens: &[Vec<u8>], usable: &[bool], rank: &[u8], ends: Ends) -> Self {
        let mut lookup: HashMap<Vec<u8>, u32> = HashMap::with_capacity(tokens.len());
        for (id, t) in tokens.iter().enumerate() {
            if t.is_empty() || !usable.get(id).copied().unwrap_or(false) {
                continue;
            }
            let r = rank.get(id).copied().unwrap_or(0);
            lookup
                .entry(t.clone())
                .and_modify(|cur| {
                    let cr = rank.get(*cur as usize).copied().unwrap_or(0);
                    if r < cr {
                        *cur = id as u32;
                    }
                })
                .or_insert(id as u32);
        }
        TargetVocab { tokens: tokens.to_vec(), lookup: Trie::new(lookup.into_iter().collect()), size: tokens.len(), ends }
    }

    /// The longest emittable target token that is a prefix of `s`.
    pub fn longest_prefix(&self, s: &[u8]) -> Option<u32> {
        self.lookup.longest_prefix(s)
    }

    /// The preferred id for exactly these bytes.
    pub fn exact(&self, s: &[u8]) -> Option<u32> {
        self.lookup.get(s)
    }
}

/// A source vocabulary as byte strings (empty for special and padded ids).
pub struct SourceVocab {
    pub tokens: Vec<Vec<u8>>,
    pub ends: Ends,
}

/// One text: byte spans of both tokenizations and the source's top-k rows.
pub struct TransferInputs<'a> {
    pub text: &'a [u8],
    pub src_ids: &'a [u32],
    pub src_spans: &'a [(u32, u32)],
    pub tgt_ids: &'a [u32],
    pub tgt_spans: &'a [(u32, u32)],
    /// Row-major [m, k]: row i predicts source token i+1; ids −1 are empty slots.
    pub src_topk_ids: &'a [i32],
    /// Log-probabilities under the source's full softmax, [m, k].
    pub src_topk_logp: &'a [f32],
    /// Per row, the log-probability of the true next source token (−CE, stored by extraction), NaN where
    /// unknown: the true token takes part with its exact probability even when it fell out of the top-k.
    pub src_true_logp: &'a [f32],
    pub k: usize,
    pub out_k: usize,
}

/// How a target row was reached.
pub const KIND_FALLBACK: u8 = 0;
pub const KIND_ONE_TO_ONE: u8 = 1;
pub const KIND_ONE_TO_MANY: u8 = 2;
pub const KIND_MANY_TO_ONE: u8 = 3;
pub const KIND_LAST: u8 = 4;

#[derive(Debug, Clone, PartialEq)]
pub struct Transferred {
    pub ids: Vec<i32>,
    pub probs: Vec<f32>,
    pub carried: Vec<bool>,
    /// Unnormalised transferred probability of the target's true next token; NaN where nothing carried.
    pub true_mass: Vec<f32>,
    /// Unnormalised mass of the row's kept `out_k` entries (the sum its probabilities were divided by);
    /// NaN where nothing carried.
    pub kept_mass: Vec<f32>,
    /// KIND_* per row.
    pub kind: Vec<u8>,
    /// Source row the transfer started from (−1 on fallback).
    pub src_row: Vec<i32>,
}

#[derive(Debug, PartialEq, Eq)]
pub struct TransferError(pub String);

impl std::fmt::Display for TransferError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

fn check(x: &TransferInputs, src: &SourceVocab, tgt: &TargetVocab) -> Result<(), TransferError> {
    let (m, n) = (x.src_ids.len(), x.tgt_ids.len());
    if x.src_spans.len() != m || x.tgt_spans.len() != n {
        return Err(TransferError(format!(
            "spans must match the tokens: {} source spans for {m} tokens, {} target spans for {n}",
            x.src_spans.len(),
            x.tgt_spans.len()
        )));
    }
    if !x.src_true_logp.is_empty() && x.src_true_logp.len() != m {
        return Err(TransferError(format!("src_true_logp has {} rows for {m} source tokens", x.src_true_logp.len())));
    }
    if x.src_topk_ids.len() != m * x.k || x.src_topk_logp.len() != m * x.k {
        return Err(TransferError(format!(
            "source top-k arrays must have shape ({m}, {}) to match {m} source tokens",
            x.k
        )));
    }
    if x.out_k == 0 {
        return Err(TransferError("out_k must be at least 1".into()));
    }
    let len = x.text.len() as u32;
    for (what, spans) in [("source", x.src_spans), ("target", x.tgt_spans)] {
        let mut prev = 0u32;
        for (i, &(s, e)) in spans.iter().enumerate() {
            if s > e || e > len || s < prev {
                return Err(TransferError(format!(
                    "{what} span {i} ({s}, {e}) is not inside the text of {len} bytes in order"
                )));
            }
            prev = s;
        }
    }
    if let Some(&id) = x.src_ids.iter().find(|&&id| id as usize >= src.tokens.len()) {
        return Err(TransferError(format!("source id {id} is outside its vocabulary of {}", src.tokens.len())));
    }
    if let Some(&id) = x.tgt_ids.iter().find(|&&id| id as usize >= tgt.size) {
        return Err(TransferError(format!("target id {id} is outside its vocabulary of {}", tgt.size)));
    }
    Ok(())
}

struct Row {
    mass: Vec<(u32, f64)>,
}

impl Row {
    fn add(&mut self, id: u32, p: f64) {
        if !(p > 0.0) {
            return;
        }
        match self.mass.iter_mut().find(|(i, _)| *i == id) {
            Some(e) => e.1 += p,
            None => self.mass.push((id, p)),
        }
    }
}

/// Index of the first source token with a non-empty span holding byte `b`, if any.
fn containing(spans: &[(u32, u32)], b: u32) -> Option<usize> {
    let u = spans.partition_point(|&(_, e)| e <= b);
    (u..spans.len()).find(|&u| spans[u].1 > spans[u].0).filter(|&u| spans[u].0 <= b)
}

/// Target rows per task of `transfer_parallel`.
pub const ROW_BLOCK: usize = 256;

impl Transferred {
    fn empty(rows: usize, out_k: usize) -> Self {
        Transferred {
            ids: vec![-1; rows * out_k],
            probs: vec![0.0; rows * out_k],
            carried: vec![false; rows],
            true_mass: vec![f32::NAN; rows],
            kept_mass: vec![f32::NAN; rows],
            kind: vec![KIND_FALLBACK; rows],
            src_row: vec![-1; rows],
        }
    }

    fn append(&mut self, other: Transferred) {
        self.ids.extend(other.ids);
        self.probs.extend(other.probs);
        self.carried.extend(other.carried);
        self.true_mass.extend(other.true_mass);
        self.kept_mass.extend(other.kept_mass);
        self.kind.extend(other.kind);
        self.src_row.extend(other.src_row);
    }
}

/// Transfer one text's source rows onto its target rows.
pub fn transfer(x: &TransferInputs, src: &SourceVocab, tgt: &TargetVocab) -> Result<Transferred, TransferError> {
    check(x, src, tgt)?;
    Ok(rows(x, src, tgt, 0, x.tgt_ids.len()))
}

/// `transfer` with the target's rows cut into blocks of `ROW_BLOCK` computed in parallel on the current
/// rayon pool, so that one long text uses every core. Every row is computed on its own from the inputs,
/// so the result is `transfer`'s, whatever the number of threads.
pub fn transfer_parallel(x: &TransferInputs, src: &SourceVocab, tgt: &TargetVocab) -> Result<Transferred, TransferError> {
    check(x, src, tgt)?;
    let n = x.tgt_ids.len();
    if n <= ROW_BLOCK {
        return Ok(rows(x, src, tgt, 0, n));
    }
    let blocks: Vec<usize> = (0..n).step_by(ROW_BLOCK).collect();
    let parts: Vec<Transferred> = blocks.par_iter().map(|&lo| rows(x, src, tgt, lo, (lo + ROW_BLOCK).min(n))).collect();
    let mut out = Transferred::empty(0, x.out_k);
    for part in parts {
        out.append(part);
    }
    Ok(out)
}

/// Target rows lo..hi of a checked text.
fn rows(x: &TransferInputs, src: &SourceVocab, tgt: &TargetVocab, lo: usize, hi: usize) -> Transferred {
    let (m, n, k, ok) = (x.src_ids.len(), x.tgt_ids.len(), x.k, x.out_k);
    let mut out = Transferred::empty(hi - lo, ok);
    let cand = |r: usize| {
        let truth = x.src_ids.get(r + 1).copied();
        let row_ids = &x.src_topk_ids[r * k..(r + 1) * k];
        let missing = truth.filter(|&t| !row_ids.contains(&(t as i32)));
        let extra = missing
            .and_then(|t| x.src_true_logp.get(r).copied().filter(|lp| lp.is_finite()).map(|lp| (t, f64::from(lp).exp())));
        (0..k)
            .filter_map(move |c| {
                let id = x.src_topk_ids[r * k + c];
                let lp = x.src_topk_logp[r * k + c];
                (id >= 0 && lp.is_finite()).then(|| (id as u32, f64::from(lp).exp()))
            })
            .chain(extra)
    };
    let bytes_of = |id: u32| -> &[u8] { src.tokens.get(id as usize).map_or(&[][..], |t| t.as_slice()) };
    let mut row = Row { mass: Vec::with_capacity(4 * k) };
    let mut piece: Vec<u8> = Vec::new();
    for j in lo..hi {
        let r = j - lo; // the row's place in this block's output
        if j + 1 == n {
            out.kind[r] = KIND_LAST;
            break;
        }
        let truth = x.tgt_ids[j + 1];
        let (b, e) = x.tgt_spans[j + 1];
        row.mass.clear();
        let mut kind = KIND_FALLBACK;
        let mut start_row: i32 = -1;
        if tgt.ends.contains(truth) && b == e {
            // The text ends here (a turn or the document): the source row whose next token is the source's
            // own end token at the same place — after the last source text before b, not past b.
            let text_end = x.src_spans.iter().filter(|s| s.1 > s.0 && s.1 <= b).map(|s| s.1).max().unwrap_or(0);
            let at_end = |u: usize| src.ends.contains(x.src_ids[u]) && (text_end..=b).contains(&x.src_spans[u].0);
            if let Some(u) = (1..m).find(|&u| at_end(u)) {
                start_row = (u - 1) as i32;
                kind = KIND_ONE_TO_ONE;
                for (v, p) in cand(u - 1) {
                    if src.ends.contains(v) {
                        row.add(truth, p);
                    } else if let Some(t) = tgt.longest_prefix(bytes_of(v)) {
                        row.add(t, p);
                    }
                }
            }
        } else if let Some(u) = containing(x.src_spans, b).filter(|&u| u >= 1 && e > b) {
            // (A target token with no bytes of its own — text its tokenizer normalised away — has no
            // span to transfer onto: the row falls back rather than borrow a neighbour's.)
            start_row = (u - 1) as i32;
            let (us, ue) = x.src_spans[u];
            let need = &x.text[us as usize..b as usize];
            kind = if !need.is_empty() {
                KIND_ONE_TO_MANY
            } else if ue < e {
                KIND_MANY_TO_ONE
            } else if ue == e {
                KIND_ONE_TO_ONE
            } else {
                KIND_ONE_TO_MANY
            };
            // Depth 0, conditioned on `need`.
            let consistent = |v: u32| {
                if v == x.src_ids[u] {
                    return true;
                }
                let t = bytes_of(v);
                t.len() > need.len() && t.starts_with(need)
            };
            let z: f64 = if need.is_empty() { 1.0 } else { cand(u - 1).filter(|&(v, _)| consistent(v)).map(|(_, p)| p).sum() };
            if z > 0.0 {
                // Stack of (source token index t, mass of the path that reached it, depth).
                let mut stack: Vec<(usize, f64, usize)> = vec![(u, 1.0 / z, 0)];
                while let Some((t, mass, depth)) = stack.pop() {
                    let (ts, te) = x.src_spans[t];
                    for (v, p) in cand(t - 1) {
                        let w = mass * p;
                        if v == x.src_ids[t] {
                            if te >= e {
                                row.add(truth, w);
                            } else if t + 1 < m && depth + 1 < MAX_DEPTH {
                                stack.push((t + 1, w, depth + 1));
                            } else if let Some(id) = tgt.longest_prefix(&x.text[b as usize..te as usize]) {
                                row.add(id, w);
                            }
                            continue;
                        }
                        if depth == 0 {
                            if !need.is_empty() && !consistent(v) {
                                continue;
                            }
                            if need.is_empty() && src.ends.contains(v) {
                                if let Some(end) = tgt.ends.by_role(&src.ends, v) {
                                    row.add(end, w);
                                }
                                continue;
                            }
                            if let Some(id) = tgt.longest_prefix(&bytes_of(v)[need.len()..]) {
                                row.add(id, w);
                            }
                        } else {
                            let tail = bytes_of(v);
                            if tail.is_empty() {
                                continue;
                            }
                            piece.clear();
                            piece.extend_from_slice(&x.text[b as usize..ts as usize]);
                            piece.extend_from_slice(tail);
                            if let Some(id) = tgt.longest_prefix(&piece) {
                                row.add(id, w);
                            }
                        }
                    }
                }
            }
        }
        let r_ids = &mut out.ids[r * ok..(r + 1) * ok];
        let r_probs = &mut out.probs[r * ok..(r + 1) * ok];
        if row.mass.is_empty() {
            r_ids[0] = truth as i32;
            r_probs[0] = 1.0;
            continue;
        }
        out.true_mass[r] = row.mass.iter().find(|(i, _)| *i == truth).map_or(0.0, |e| e.1 as f32);
        row.mass.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
        row.mass.truncate(ok);
        let total: f64 = row.mass.iter().map(|e| e.1).sum();
        out.kept_mass[r] = total as f32;
        for (slot, (id, p)) in row.mass.iter().enumerate() {
            r_ids[slot] = *id as i32;
            r_probs[slot] = (p / total) as f32;
        }
        out.carried[r] = true;
        out.kind[r] = kind;
        out.src_row[r] = start_row;
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vocab(tokens: &[&str]) -> Vec<Vec<u8>> {
        tokens.iter().map(|t| t.as_bytes().to_vec()).collect()
    }

    fn target(tokens: &[&str]) -> TargetVocab {
        let v = vocab(tokens);
        TargetVocab::new(&v, &vec![true; v.len()], &vec![0; v.len()], Ends::default())
    }

    fn spans(text: &str, pieces: &[&str]) -> Vec<(u32, u32)> {
        let mut at = 0u32;
        pieces
            .iter()
            .map(|p| {
                assert_eq!(&text[at as usize..at as usize + p.len()], *p);
                let s = (at, at + p.len() as u32);
                at = s.1;
                s
            })
            .collect()
    }

    /// Source "the cat": pieces "the", " cat"; target pieces "the", " c", "at".
    #[test]
    fn one_to_many_first_piece_and_conditional_continuation() {
        let text = "the cat";
        let src_v = SourceVocab { tokens: vocab(&["the", " cat", " car", " dog", " ca"]), ends: Ends::default() };
        let tgt_v = target(&["the", " c", "at", " d", "ar", " ca", "r"]);
        // Row 0 predicts " cat" .6, " car" .3, " dog" .1.
        let topk_ids = [1, 2, 3, 0, 0, -1];
        let lp = [0.6f32.ln(), 0.3f32.ln(), 0.1f32.ln(), 0.0, 0.0, 0.0];
        let x = TransferInputs {
            text: text.as_bytes(),
            src_ids: &[0, 1],
            src_spans: &spans(text, &["the", " cat"]),
            tgt_ids: &[0, 1, 2],
            tgt_spans: &spans(text, &["the", " c", "at"]),
            src_topk_ids: &topk_ids,
            src_topk_logp: &lp,
            src_true_logp: &[],
            k: 3,
            out_k: 3,
        };
        let out = transfer(&x, &src_v, &tgt_v).unwrap();
        // Row 0 predicts " c": true " cat" → " c" (.6); " car" → longest prefix " ca" (.3); " dog" → " d".
        assert_eq!(&out.ids[0..3], &[1, 5, 3]);
        assert!((out.probs[0] - 0.6).abs() < 1e-6 && (out.probs[1] - 0.3).abs() < 1e-6);
        assert_eq!(out.kind[0], KIND_ONE_TO_MANY);
        // Row 1 predicts "at" inside " cat": need " c"; consistent " cat" (.6) and " car" (.3) → 2/3, 1/3.
        assert_eq!(&out.ids[3..5], &[2, 4]);
        assert!((out.probs[3] - 2.0 / 3.0).abs() < 1e-6 && (out.probs[4] - 1.0 / 3.0).abs() < 1e-6);
        assert!((out.true_mass[1] - 2.0 / 3.0).abs() < 1e-6);
        assert_eq!(out.kind[2], KIND_LAST);
        assert_eq!(out.ids[6], -1);
    }

    /// Source "a" "b" "c"; target "a" "bc": the chain rule along the source.
    #[test]
    fn many_to_one_chain_rule() {
        let text = "abc";
        let src_v = SourceVocab { tokens: vocab(&["a", "b", "c", "x"]), ends: Ends::default() };
        let tgt_v = target(&["a", "bc", "b", "bx", "x"]);
        // Row 0 → "b" .8, "x" .2; row 1 → "c" .5, "x" .5.
        let topk_ids = [1, 3, 2, 3, 0, 0];
        let lp = [0.8f32.ln(), 0.2f32.ln(), 0.5f32.ln(), 0.5f32.ln(), f32::NEG_INFINITY, f32::NEG_INFINITY];
        let x = TransferInputs {
            text: text.as_bytes(),
            src_ids: &[0, 1, 2],
            src_spans: &spans(text, &["a", "b", "c"]),
            tgt_ids: &[0, 1],
            tgt_spans: &spans(text, &["a", "bc"]),
            src_topk_ids: &topk_ids,
            src_topk_logp: &lp,
            src_true_logp: &[],
            k: 2,
            out_k: 4,
        };
        let out = transfer(&x, &src_v, &tgt_v).unwrap();
        // "bc" = .8·.5 = .4; "bx" = .8·.5 = .4; "x" = .2. Ties by id: "bc" (1) before "bx" (3).
        assert_eq!(&out.ids[0..4], &[1, 3, 4, -1]);
        assert!((out.probs[0] - 0.4).abs() < 1e-6 && (out.probs[2] - 0.2).abs() < 1e-6);
        assert!((out.true_mass[0] - 0.4).abs() < 1e-6);
        assert_eq!(out.kind[0], KIND_MANY_TO_ONE);
        assert!((out.kept_mass[0] - 1.0).abs() < 1e-6 && out.kept_mass[1].is_nan());
    }

    /// `kept_mass` is what each row held before its renormalisation: a 1:1 row keeps the source's top-k
    /// mass, truncation to `out_k` drops the smallest entries' mass, and along an n:1 chain the true path's
    /// mass is multiplied by the next row's top-k mass (the chain rule leaves out what it cannot score).
    #[test]
    fn kept_mass_is_each_row_before_renormalisation() {
        let text = "abc";
        let src_v = SourceVocab { tokens: vocab(&["a", "b", "c", "x"]), ends: Ends::default() };
        // Row 0 → "b" .5, "x" .2 (0.3 outside the top-2); row 1 → "c" .4, "x" .4 (0.2 outside).
        let topk_ids = [1, 3, 2, 3, 0, 0];
        let lp = [0.5f32.ln(), 0.2f32.ln(), 0.4f32.ln(), 0.4f32.ln(), f32::NEG_INFINITY, f32::NEG_INFINITY];
        let run = |tgt_pieces: &[&str], tgt_ids: &[u32], tgt_vocab: &[&str], out_k: usize| {
            let x = TransferInputs {
                text: text.as_bytes(),
                src_ids: &[0, 1, 2],
                src_spans: &spans(text, &["a", "b", "c"]),
                tgt_ids,
                tgt_spans: &spans(text, tgt_pieces),
                src_topk_ids: &topk_ids,
                src_topk_logp: &lp,
                src_true_logp: &[],
                k: 2,
                out_k,
            };
            transfer(&x, &src_v, &target(tgt_vocab)).unwrap()
        };
        // The same pieces (1:1): each row keeps its source row's top-k mass.
        let same = run(&["a", "b", "c"], &[0, 1, 2], &["a", "b", "c", "x"], 2);
        assert!((same.kept_mass[0] - 0.7).abs() < 1e-6 && (same.kept_mass[1] - 0.8).abs() < 1e-6);
        assert!((same.probs[0] - 0.5 / 0.7).abs() < 1e-6);
        // Truncated to one entry: only the largest entry's mass is kept.
        let one = run(&["a", "b", "c"], &[0, 1, 2], &["a", "b", "c", "x"], 1);
        assert!((one.kept_mass[0] - 0.5).abs() < 1e-6 && (one.probs[0] - 1.0).abs() < 1e-6);
        // n:1 onto "bc": "bc" .5·.4, "bx" .5·.4, "x" .2 → kept .6; true-token mass .2 = probs · kept.
        let chain = run(&["a", "bc"], &[0, 1], &["a", "bc", "b", "bx", "x"], 4);
        assert!((chain.kept_mass[0] - 0.6).abs() < 1e-6);
        assert!((chain.true_mass[0] - chain.probs[0] * chain.kept_mass[0]).abs() < 1e-6);
    }

    #[test]
    fn same_tokenizer_gives_the_source_rows_back() {
        let text = "ab ab";
        let toks = ["a", "b", " ", " a", "ab"];
        let src_v = SourceVocab { tokens: vocab(&toks), ends: Ends::default() };
        let tgt_v = target(&toks);
        let ids = [4u32, 3, 1];
        let sp = spans(text, &["ab", " a", "b"]);
        let topk_ids = [3, 2, 0, 1, 0, 4, -1, -1, -1];
        let lp = [0.7f32.ln(), 0.2f32.ln(), 0.1f32.ln(), 0.5f32.ln(), 0.25f32.ln(), 0.25f32.ln(), 0.0, 0.0, 0.0];
        let x = TransferInputs {
            text: text.as_bytes(),
            src_ids: &ids,
            src_spans: &sp,
            tgt_ids: &ids,
            tgt_spans: &sp,
            src_topk_ids: &topk_ids,
            src_topk_logp: &lp,
            src_true_logp: &[],
            k: 3,
            out_k: 3,
        };
        let out = transfer(&x, &src_v, &tgt_v).unwrap();
        assert_eq!(&out.ids[0..3], &[3, 2, 0]);
        assert_eq!(&out.ids[3..6], &[1, 0, 4]);
        for (a, b) in out.probs[0..6].iter().zip([0.7, 0.2, 0.1, 0.5, 0.25, 0.25]) {
            assert!((a - b).abs() < 1e-6);
        }
        assert_eq!(out.carried, vec![true, true, false]);
    }

    #[test]
    fn twins_specials_and_padding_get_no_mass() {
        // Target: "," twice (a byte-fallback twin at id 1, rank 1) and a special id 2 with no bytes.
        let tv = vec![b"a".to_vec(), b",".to_vec(), Vec::new(), b",".to_vec()];
        let tgt_v = TargetVocab::new(&tv, &[true, true, false, true], &[0, 1, 0, 0], Ends { eos: Some(2), eot: None });
        assert_eq!(tgt_v.exact(b","), Some(3));
        let src_v = SourceVocab { tokens: vec![b"a".to_vec(), b",".to_vec(), Vec::new(), Vec::new()], ends: Ends { eos: Some(2), eot: None } };
        let text = "a,";
        // Row 0 → "," .5, eos .3, padded id 3 .2.
        let topk_ids = [1, 2, 3, -1, -1, -1];
        let lp = [0.5f32.ln(), 0.3f32.ln(), 0.2f32.ln(), 0.0, 0.0, 0.0];
        let x = TransferInputs {
            text: text.as_bytes(),
            src_ids: &[0, 1],
            src_spans: &spans(text, &["a", ","]),
            tgt_ids: &[0, 3],
            tgt_spans: &spans(text, &["a", ","]),
            src_topk_ids: &topk_ids,
            src_topk_logp: &lp,
            src_true_logp: &[],
            k: 3,
            out_k: 3,
        };
        let out = transfer(&x, &src_v, &tgt_v).unwrap();
        assert_eq!(&out.ids[0..3], &[3, 2, -1]);
        assert!((out.probs[0] - 0.625).abs() < 1e-6);
    }

    /// Two chat templates: the source ends each turn with its end-of-turn token (id 2) and has a separate
    /// end of sequence (id 3); the target ends turns with its one end token (id 2, both roles). Source spans
    /// are already carried into the target's text, so each end token sits where its turn's text ends.
    #[test]
    fn turn_ends_map_by_role_at_their_own_turn() {
        let text = "Hi Yo";
        let tgt_tokens = vec![b"Hi".to_vec(), b" Yo".to_vec(), Vec::new()];
        let tgt_v = TargetVocab::new(&tgt_tokens, &[true, true, false], &[0, 0, 0], Ends { eos: Some(2), eot: Some(2) });
        let src_tokens = vec![b"Hi".to_vec(), b" Yo".to_vec(), Vec::new(), Vec::new()];
        let src_v = SourceVocab { tokens: src_tokens, ends: Ends { eos: Some(3), eot: Some(2) } };
        // Rows: after "Hi" → end of turn .7, " Yo" .3; after the turn end → " Yo" .9, eos .1;
        // after " Yo" → end of turn .5, eos .5.
        let topk_ids = [2, 1, 1, 3, 2, 3, -1, -1];
        let lp = [0.7f32.ln(), 0.3f32.ln(), 0.9f32.ln(), 0.1f32.ln(), 0.5f32.ln(), 0.5f32.ln(), 0.0, 0.0];
        let x = TransferInputs {
            text: text.as_bytes(),
            src_ids: &[0, 2, 1, 2],
            src_spans: &[(0, 2), (2, 2), (2, 5), (5, 5)],
            tgt_ids: &[0, 2, 1, 2],
            tgt_spans: &[(0, 2), (2, 2), (2, 5), (5, 5)],
            src_topk_ids: &topk_ids,
            src_topk_logp: &lp,
            src_true_logp: &[],
            k: 2,
            out_k: 2,
        };
        let out = transfer(&x, &src_v, &tgt_v).unwrap();
        // Row 0 predicts the first turn's end: it starts from source row 0 (the first turn's end token),
        // not from the last end token of the text.
        assert_eq!(out.src_row[0], 0);
        assert_eq!(&out.ids[0..2], &[2, 1]);
        assert!((out.probs[0] - 0.7).abs() < 1e-6);
        // Row 1: the source's end of sequence maps by role onto the target's end token.
        assert_eq!(&out.ids[2..4], &[1, 2]);
        assert!((out.probs[3] - 0.1).abs() < 1e-6);
        // Row 2: at the text's end both source end tokens count for the target's end token.
        assert_eq!(out.src_row[2], 2);
        assert_eq!(&out.ids[4..6], &[2, -1]);
        assert!((out.probs[4] - 1.0).abs() < 1e-6);
    }

    /// The true source token outside the top-k still carries its exact probability (from its CE).
    #[test]
    fn true_token_outside_the_top_k_uses_its_stored_probability() {
        let text = "ab";
        let src_v = SourceVocab { tokens: vocab(&["a", "b", "c"]), ends: Ends::default() };
        let tgt_v = target(&["a", "b", "c"]);
        let x = TransferInputs {
            text: text.as_bytes(),
            src_ids: &[0, 1],
            src_spans: &spans(text, &["a", "b"]),
            tgt_ids: &[0, 1],
            tgt_spans: &spans(text, &["a", "b"]),
            src_topk_ids: &[2, -1],
            src_topk_logp: &[0.7f32.ln(), 0.0],
            src_true_logp: &[0.2f32.ln(), f32::NAN],
            k: 1,
            out_k: 2,
        };
        let out = transfer(&x, &src_v, &tgt_v).unwrap();
        assert_eq!(&out.ids[0..2], &[2, 1]);
        assert!((out.true_mass[0] - 0.2).abs() < 1e-6);
        assert!((out.probs[1] - 0.2 / 0.9).abs() < 1e-6);
    }

    #[test]
    fn bad_spans_are_errors() {
        let src_v = SourceVocab { tokens: vocab(&["a"]), ends: Ends::default() };
        let tgt_v = target(&["a"]);
        let x = TransferInputs {
            text: b"a",
            src_ids: &[0],
            src_spans: &[(0, 2)],
            tgt_ids: &[0],
            tgt_spans: &[(0, 1)],
            src_topk_ids: &[0],
            src_topk_logp: &[0.0],
            src_true_logp: &[],
            k: 1,
            out_k: 1,
        };
        assert!(transfer(&x, &src_v, &tgt_v).is_err());
    }
}
