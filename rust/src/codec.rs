//! The top-k codec of the extraction store: one window of one model → a few bytes per token.
//!
//! Everything a window holds (input tokens, their character offsets, per position the top-k ids and
//! log-probabilities, the cross-entropy of the next token, an optional loss mask) is written into one
//! byte string by an adaptive binary range coder (the LZMA one: 11-bit probabilities, shift 5). Every
//! window starts its models from the same state, so any window decodes on its own: either fresh
//! (every probability ½; format "topk-rc/1") or a per-shard [`Prior`] ("topk-rc/2"), the probabilities
//! counted over the shard's own windows and stored with it, so a short window does not pay for
//! learning them (on SmolLM2, a fresh start costs 25% more bytes/token on 50-token texts, 1.5% on
//! 2,000-token ones). The models keep adapting within the window either way.
//!
//! What is coded, per window of n tokens and k slots (ids are *ranks* in a per-shard table sorted by
//! frequency, so common tokens are small numbers):
//! * input ranks (an unsigned symbol each) and offset deltas (zig-zag);
//! * per position t: −logsumexp(top-k log-probs) ("kept mass") on a 1/1024-nat grid; the top-k
//!   *shape* as quantised gaps `q_j − q_{j−1}` where `q_j = round((lp_0 − lp_j) / step)` (monotone, so
//!   gaps are ≥ 0 and small); the k ids, each either symbol 0 = "the next input token" or 1 + rank;
//!   the CE (1/1024-nat grid) of the next token, as a residual from the decoded log-prob of its slot
//!   when the next token is in the top-k, else on its own;
//! * the loss mask bits when present.
//!
//! Decoding gives `lp_j = lse − d(q_j) − logsumexp_i(−d(q_i))` with `d` the inverse of the shape grid
//! (see `Params`): the kept mass is exact to the grid, the shape carries the quantisation error whose
//! KL the encoder measures and returns.
//!
//! Unsigned symbols are binarised as a bucket (bit length, a 6-level adaptive tree per context), the
//! top 4 bits below the leading one (adaptive per bucket) and the remaining bits sent flat.

use std::fmt;

pub const FINE: f64 = 1.0 / 256.0; // grid of the kept mass and of the CE, in nats (error ≤ 1/512)
const MAX_Q: u64 = 1 << 24; // cap of a quantised gap (−inf log-probs land here)
const PROB_BITS: u32 = 11;
const PROB_INIT: u16 = 1 << (PROB_BITS - 1);
const MOVE_BITS: u32 = 5;
const TOP: u32 = 1 << 24;
const BUCKET_BITS: u32 = 6;
const MANT_BITS: u32 = 4;

#[derive(Debug, Clone, PartialEq)]
pub struct CodecError(pub String);

impl fmt::Display for CodecError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::error::Error for CodecError {}

fn err<T>(msg: impl Into<String>) -> Result<T, CodecError> {
    Err(CodecError(msg.into()))
}

// ---------------------------------------------------------------------------------------------
// Range coder

struct Encoder {
    low: u64,
    range: u32,
    cache: u8,
    cache_size: u64,
    out: Vec<u8>,
}

impl Encoder {
    fn new() -> Self {
        Encoder { low: 0, range: u32::MAX, cache: 0, cache_size: 1, out: Vec::new() }
    }

    fn shift_low(&mut self) {
        if (self.low as u32) < 0xFF00_0000 || (self.low >> 32) != 0 {
            let carry = (self.low >> 32) as u8;
            let mut temp = self.cache;
            loop {
                self.out.push(temp.wrapping_add(carry));
                temp = 0xFF;
                self.cache_size -= 1;
                if self.cache_size == 0 {
                    break;
                }
            }
            self.cache = ((self.low >> 24) & 0xFF) as u8;
        }
        self.cache_size += 1;
        self.low = (self.low & 0x00FF_FFFF) << 8;
    }

    fn encode_bit(&mut self, prob: &mut u16, bit: bool) {
        let bound = (self.range >> PROB_BITS) * u32::from(*prob);
        if bit {
            self.low += u64::from(bound);
            self.range -= bound;
            *prob -= *prob >> MOVE_BITS;
        } else {
            self.range = bound;
            *prob += ((1 << PROB_BITS) - *prob) >> MOVE_BITS;
        }
        while self.range < TOP {
            self.range <<= 8;
            self.shift_low();
        }
    }

    fn encode_direct(&mut self, value: u64, nbits: u32) {
        for i in (0..nbits).rev() {
            self.range >>= 1;
            if (value >> i) & 1 == 1 {
                self.low += u64::from(self.range);
            }
            while self.range < TOP {
                self.range <<= 8;
                self.shift_low();
            }
        }
    }

    fn finish(mut self) -> Vec<u8> {
        for _ in 0..5 {
            self.shift_low();
        }
        self.out
    }
}

struct Decoder<'a> {
    data: &'a [u8],
    pos: usize,
    range: u32,
    code: u32,
}

impl<'a> Decoder<'a> {
    fn new(data: &'a [u8]) -> Result<Self, CodecError> {
        if data.len() < 5 {
            return err(format!("encoded window of {} bytes is too short (corrupt data)", data.len()));
        }
        let mut d = Decoder { data, pos: 1, range: u32::MAX, code: 0 };
        for _ in 0..4 {
            d.code = (d.code << 8) | u32::from(d.next_byte());
        }
        Ok(d)
    }

    fn next_byte(&mut self) -> u8 {
        // Past the end the stream reads as zeros; `check_end` reports an overrun afterwards.
        let b = self.data.get(self.pos).copied().unwrap_or(0);
        self.pos += 1;
        b
    }

    fn bit(&mut self, prob: &mut u16) -> bool {
        let bound = (self.range >> PROB_BITS) * u32::from(*prob);
        let bit = if self.code < bound {
            self.range = bound;
            *prob += ((1 << PROB_BITS) - *prob) >> MOVE_BITS;
            false
        } else {
            self.code -= bound;
            self.range -= bound;
            *prob -= *prob >> MOVE_BITS;
            true
        };
        while self.range < TOP {
            self.range <<= 8;
            self.code = (self.code << 8) | u32::from(self.next_byte());
        }
        bit
    }

    fn direct(&mut self, nbits: u32) -> u64 {
        let mut v = 0u64;
        for _ in 0..nbits {
            self.range >>= 1;
            let bit = self.code >= self.range;
            if bit {
                self.code -= self.range;
            }
            v = (v << 1) | u64::from(bit);
            while self.range < TOP {
                self.range <<= 8;
                self.code = (self.code << 8) | u32::from(self.next_byte());
            }
        }
        v
    }

    fn check_end(&self) -> Result<(), CodecError> {
        if self.pos > self.data.len() {
            return err("encoded window ends early (corrupt or truncated data)");
        }
        Ok(())
    }
}

// ---------------------------------------------------------------------------------------------
// Adaptive models for unsigned symbols and bits

/// Where the window coder sends its bits: the range encoder, or a [`Counts`] learning a prior.
trait BitSink {
    /// Code `bit` with the adaptive probability `probs[i]`.
    fn bit(&mut self, probs: &mut [u16], i: usize, bit: bool);
    /// Code the low `nbits` of `value` flat (no model).
    fn direct(&mut self, value: u64, nbits: u32);
}

impl BitSink for Encoder {
    fn bit(&mut self, probs: &mut [u16], i: usize, bit: bool) {
        self.encode_bit(&mut probs[i], bit);
    }

    fn direct(&mut self, value: u64, nbits: u32) {
        self.encode_direct(value, nbits);
    }
}

/// Probability cells of one context of a `UintModel`: the bucket tree, then 65 mantissa trees.
const UINT_NODES: usize = (1 << BUCKET_BITS) + (65 << MANT_BITS);

/// Unsigned integers in independent contexts: bucket tree per context, mantissa tree per bucket.
/// The cells live in the window's flat probability array (`Models::probs`) from `at` on.
#[derive(Clone, Copy)]
struct UintModel {
    at: usize,
}

impl UintModel {
    fn encode<S: BitSink>(self, probs: &mut [u16], sink: &mut S, ctx: usize, v: u64) {
        let base = self.at + ctx * UINT_NODES;
        let b = 64 - v.leading_zeros(); // bit length: 0 for v = 0
        let mut node = 1usize;
        for i in (0..BUCKET_BITS).rev() {
            let bit = (b >> i) & 1 == 1;
            sink.bit(probs, base + node, bit);
            node = node * 2 + usize::from(bit);
        }
        if b <= 1 {
            return;
        }
        let nbits = b - 1;
        let m = v - (1u64 << nbits);
        let top = nbits.min(MANT_BITS);
        let hi = m >> (nbits - top);
        let mant = base + (1 << BUCKET_BITS) + ((b as usize) << MANT_BITS);
        let mut node = 1usize;
        for i in (0..top).rev() {
            let bit = (hi >> i) & 1 == 1;
            sink.bit(probs, mant + node, bit);
            node = node * 2 + usize::from(bit);
        }
        sink.direct(m & ((1u64 << (nbits - top)) - 1), nbits - top);
    }

    fn decode(self, probs: &mut [u16], dec: &mut Decoder, ctx: usize) -> u64 {
        let base = self.at + ctx * UINT_NODES;
        let mut node = 1usize;
        for _ in 0..BUCKET_BITS {
            let bit = dec.bit(&mut probs[base + node]);
            node = node * 2 + usize::from(bit);
        }
        let b = (node - (1 << BUCKET_BITS)) as u32;
        if b <= 1 {
            return u64::from(b);
        }
        let b = b.min(64);
        let nbits = b - 1;
        let top = nbits.min(MANT_BITS);
        let mant = base + (1 << BUCKET_BITS) + ((b as usize) << MANT_BITS);
        let mut node = 1usize;
        for _ in 0..top {
            let bit = dec.bit(&mut probs[mant + node]);
            node = node * 2 + usize::from(bit);
        }
        let hi = (node - (1 << top)) as u64;
        let lo = dec.direct(nbits - top);
        (1u64 << nbits) + (hi << (nbits - top)) + lo
    }
}

fn zigzag(v: i64) -> u64 {
    ((v << 1) ^ (v >> 63)) as u64
}

fn unzigzag(v: u64) -> i64 {
    ((v >> 1) as i64) ^ -((v & 1) as i64)
}

const SLOT_CONTEXTS: usize = 32;

// The layout of `Models::probs`, in units of one UintModel context.
const INPUT: UintModel = UintModel { at: 0 };
const OFFSET: UintModel = UintModel { at: UINT_NODES };
const LSE: UintModel = UintModel { at: 2 * UINT_NODES };
const GAP: UintModel = UintModel { at: 3 * UINT_NODES }; // SLOT_CONTEXTS contexts
const IDS: UintModel = UintModel { at: (3 + SLOT_CONTEXTS) * UINT_NODES }; // SLOT_CONTEXTS contexts
const CE: UintModel = UintModel { at: (3 + 2 * SLOT_CONTEXTS) * UINT_NODES }; // ctx 0: residual after a hit, 1: CE outside the top-k
const MASK: usize = (5 + 2 * SLOT_CONTEXTS) * UINT_NODES; // 2 cells: previous bit 0 / 1
/// The number of adaptive probabilities a window uses (the length of a prior).
pub const MODEL_CELLS: usize = MASK + 2;

/// All adaptive state of one window; the same sequence of calls in encoder and decoder.
struct Models {
    probs: Vec<u16>,
}

impl Models {
    fn new(prior: Option<&Prior>) -> Self {
        match prior {
            Some(p) => Models { probs: p.probs.clone() },
            None => Models { probs: vec![PROB_INIT; MODEL_CELLS] },
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The per-shard prior

/// Prior probabilities are stored as one of 65 levels per cell, evenly spaced in the logistic domain
/// between the adaptive coder's own limits (31/2048 and 2017/2048, where shift-5 updates saturate);
/// level 32 is ½, the fresh state. A table, not `exp`, so every machine reads a prior the same way.
const PRIOR_LEVELS: [u16; 65] = [
    31, 35, 40, 46, 52, 59, 67, 76, 86, 97, 110, 124, 140, 158, 179, 201, 226, 253, 284, 317, 354, 394, 437, 483, 533, 586,
    642, 701, 763, 826, 891, 957, 1024, 1091, 1157, 1222, 1285, 1347, 1406, 1462, 1515, 1565, 1611, 1654, 1694, 1731, 1764,
    1795, 1822, 1847, 1869, 1890, 1908, 1924, 1938, 1951, 1962, 1972, 1981, 1989, 1996, 2002, 2008, 2013, 2017,
];
const FRESH_LEVEL: u8 = 32;
/// A cell seen fewer times than this over the shard keeps the fresh level: its estimate is noise,
/// and untouched levels compress to almost nothing in the stored prior.
const PRIOR_MIN_COUNT: u64 = 8;

/// How often each adaptive cell saw a 0 and a 1 over a set of windows (the counts are additive, so
/// windows can be counted in parallel and summed in any order with the same result).
#[derive(Debug, Clone, PartialEq)]
pub struct Counts(Vec<[u64; 2]>);

impl Default for Counts {
    fn default() -> Self {
        Counts(vec![[0; 2]; MODEL_CELLS])
    }
}

impl Counts {
    pub fn merge(mut self, other: Counts) -> Counts {
        for (a, b) in self.0.iter_mut().zip(&other.0) {
            a[0] += b[0];
            a[1] += b[1];
        }
        self
    }
}

impl BitSink for Counts {
    // The counter reads no probabilities: the bits to code depend only on the window's values.
    fn bit(&mut self, _probs: &mut [u16], i: usize, bit: bool) {
        self.0[i][usize::from(bit)] += 1;
    }

    fn direct(&mut self, _value: u64, _nbits: u32) {}
}

/// The starting probabilities of every window of a shard (format "topk-rc/2").
#[derive(Debug, Clone, PartialEq)]
pub struct Prior {
    levels: Vec<u8>,
    probs: Vec<u16>,
}

impl Prior {
    /// Each cell at the level nearest its Krichevsky–Trofimov estimate P(0) = (n0 + ½) / (n + 1)
    /// (integer arithmetic, so the stored bytes are the same on every machine).
    pub fn from_counts(c: &Counts) -> Prior {
        let levels = c
            .0
            .iter()
            .map(|&[n0, n1]| {
                let n = n0 + n1;
                if n < PRIOR_MIN_COUNT {
                    return FRESH_LEVEL;
                }
                // target = 2048 · (2 n0 + 1) / (2 n + 2), compared in those units to avoid rounding
                let (num, den) = ((2 * n0 + 1) << PROB_BITS, 2 * n + 2);
                let mut best = (0u8, u64::MAX);
                for (level, &p) in PRIOR_LEVELS.iter().enumerate() {
                    let dist = (u64::from(p) * den).abs_diff(num);
                    if dist < best.1 {
                        best = (level as u8, dist);
                    }
                }
                best.0
            })
            .collect::<Vec<u8>>();
        Prior::from_levels(&levels).expect("levels from counts are valid")
    }

    /// A stored prior: one level (0..=64) per cell, `MODEL_CELLS` bytes.
    pub fn from_levels(levels: &[u8]) -> Result<Prior, CodecError> {
        if levels.len() != MODEL_CELLS {
            return err(format!("codec prior has {} cells, this codec uses {MODEL_CELLS} (corrupt or foreign prior)", levels.len()));
        }
        let mut probs = Vec::with_capacity(MODEL_CELLS);
        for &l in levels {
            match PRIOR_LEVELS.get(usize::from(l)) {
                Some(&p) => probs.push(p),
                None => return err(format!("codec prior holds level {l}, beyond 0..=64 (corrupt or foreign prior)")),
            }
        }
        Ok(Prior { levels: levels.to_vec(), probs })
    }

    pub fn levels(&self) -> &[u8] {
        &self.levels
    }
}

// ---------------------------------------------------------------------------------------------
// The window format

/// Quantisation of the top-k shape. A slot `d = lp_0 − lp_j` nats below the top one is quantised in
/// the companded domain `u = (knee/step)·ln(1 + d/knee)`: the grid is `step` nats near the top and
/// widens linearly with `d`, because a slot's share of the KL scales with its probability (∝ e^{−d})
/// times its squared error, so unlikely slots can take larger errors for the same KL. `knee = 0`
/// gives the plain uniform grid `u = d/step`.
#[derive(Debug, Clone, Copy)]
pub struct Params {
    pub k: usize,
    pub step: f64,
    pub knee: f64,
}

impl Params {
    fn to_grid(&self, d: f64) -> f64 {
        if self.knee > 0.0 {
            (self.knee / self.step) * (d / self.knee).ln_1p()
        } else {
            d / self.step
        }
    }

    fn from_grid(&self, q: u64) -> f64 {
        if self.knee > 0.0 {
            self.knee * ((q as f64) * self.step / self.knee).exp_m1()
        } else {
            (q as f64) * self.step
        }
    }

    /// The largest quantised value: −inf log-probs land here (about 1e4 nats below the top).
    fn max_q(&self) -> u64 {
        (self.to_grid(1e4).ceil() as u64).clamp(1, MAX_Q)
    }
}

/// One window to encode. Ids are ranks in the shard's table; offsets are absolute code points.
pub struct WindowIn<'a> {
    pub input: &'a [u32],
    pub offsets: &'a [i64],
    pub char_start: i64,
    pub topk: &'a [u32],   // n × k
    pub logp: &'a [f32],   // n × k, sorted descending per row
    pub ce: &'a [f32],     // n; the last one is ignored (no next token)
    pub mask: Option<&'a [bool]>,
}

#[derive(Debug, Clone, Default)]
pub struct Encoded {
    pub bytes: Vec<u8>,
    pub kl_sum: f64, // Σ over positions of KL(original top-k ‖ decoded top-k), both renormalised
    pub kl_max: f64,
}

#[derive(Debug, Clone, Default, PartialEq)]
pub struct WindowOut {
    pub input: Vec<u32>,
    pub offsets: Vec<i64>,
    pub topk: Vec<u32>,
    pub logp: Vec<f32>,
    pub ce: Vec<f32>, // NaN at the last position
    pub mask: Option<Vec<bool>>,
}

fn grid(x: f64) -> u64 {
    let v = (x / FINE).round();
    if v.is_nan() || v <= 0.0 {
        0
    } else {
        v.min(u32::MAX as f64) as u64
    }
}

/// The decoded log-probs of one position from the coded kept mass and gaps (same in both directions).
fn reconstruct(u_lse: u64, q: &[u64], p: &Params, out: &mut [f64]) {
    let lse = -(u_lse as f64) * FINE;
    for (o, &qi) in out.iter_mut().zip(q) {
        *o = -p.from_grid(qi);
    }
    // logsumexp(−d); d[0] = 0 is the maximum term
    let shape_lse = out.iter().map(|&x| x.exp()).sum::<f64>().ln();
    for o in out.iter_mut() {
        *o += lse - shape_lse;
    }
}

fn logsumexp(xs: &[f64]) -> f64 {
    let m = xs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if !m.is_finite() {
        return m;
    }
    m + xs.iter().map(|&x| (x - m).exp()).sum::<f64>().ln()
}

/// Code one window, its models starting from `prior` (fresh when None).
pub fn encode_window(w: &WindowIn, p: Params, prior: Option<&Prior>) -> Result<Encoded, CodecError> {
    let mut enc = Encoder::new();
    let mut m = Models::new(prior);
    let (kl_sum, kl_max) = code_window(w, p, &mut m.probs, &mut enc)?;
    Ok(Encoded { bytes: enc.finish(), kl_sum, kl_max })
}

/// Add the bits one window would code to `counts` (the training pass of a prior).
pub fn count_window(w: &WindowIn, p: Params, counts: &mut Counts) -> Result<(), CodecError> {
    code_window(w, p, &mut [], counts).map(|_| ())
}

/// Send every symbol of a window to `sink`; returns (Σ KL, max KL) of the quantisation.
fn code_window<S: BitSink>(w: &WindowIn, p: Params, probs: &mut [u16], sink: &mut S) -> Result<(f64, f64), CodecError> {
    let (n, k) = (w.input.len(), p.k);
    if k == 0 || k > SLOT_CONTEXTS * 1024 {
        return err(format!("k = {k} is not supported"));
    }
    if !(p.step > 0.0 && p.step.is_finite()) {
        return err(format!("quantisation step must be positive, got {}", p.step));
    }
    if !(p.knee >= 0.0 && p.knee.is_finite()) {
        return err(format!("quantisation knee must be ≥ 0, got {}", p.knee));
    }
    let max_q = p.max_q();
    if w.offsets.len() != n || w.ce.len() != n || w.topk.len() != n * k || w.logp.len() != n * k {
        return err(format!(
            "window arrays disagree: {n} tokens, {} offsets, {} CE values, {} top-k ids and {} log-probs for k = {k}",
            w.offsets.len(),
            w.ce.len(),
            w.topk.len(),
            w.logp.len()
        ));
    }
    if let Some(m) = w.mask {
        if m.len() != n {
            return err(format!("loss mask has {} entries for {n} tokens", m.len()));
        }
    }
    let enc = sink;
    let mut prev = w.char_start;
    for t in 0..n {
        INPUT.encode(probs, enc, 0, u64::from(w.input[t]));
        OFFSET.encode(probs, enc, 0, zigzag(w.offsets[t] - prev));
        prev = w.offsets[t];
    }
    if let Some(mask) = w.mask {
        let mut ctx = 0usize;
        for &b in mask {
            enc.bit(probs, MASK + ctx, b);
            ctx = usize::from(b);
        }
    }
    let (mut kl_sum, mut kl_max) = (0.0f64, 0.0f64);
    let mut q = vec![0u64; k];
    let mut orig = vec![0f64; k];
    let mut dec = vec![0f64; k];
    for t in 0..n {
        let row = &w.logp[t * k..(t + 1) * k];
        for (o, &x) in orig.iter_mut().zip(row) {
            *o = f64::from(x);
        }
        if !orig[0].is_finite() {
            return err(format!("position {t}: the top log-prob is {} (the model produced non-finite logits)", orig[0]));
        }
        for j in 1..k {
            if orig[j] > orig[j - 1] || orig[j].is_nan() {
                return err(format!("position {t}: top-k log-probs are not sorted in decreasing order"));
            }
        }
        let lse = logsumexp(&orig);
        let u_lse = grid(-lse);
        LSE.encode(probs, enc, 0, u_lse);
        for j in 0..k {
            let rel = p.to_grid(orig[0] - orig[j]);
            q[j] = if rel.is_finite() { (rel.round() as u64).min(max_q) } else { max_q };
        }
        for j in 1..k {
            GAP.encode(probs, enc, j.min(SLOT_CONTEXTS - 1), q[j] - q[j - 1]);
        }
        reconstruct(u_lse, &q, &p, &mut dec);
        // KL between the renormalised original and decoded top-k (the decoded one is softmax(−q·step))
        let dl = logsumexp(&dec);
        let mut kl = 0.0;
        for j in 0..k {
            let lp = orig[j] - lse;
            if lp.is_finite() {
                kl += lp.exp() * (lp - (dec[j] - dl));
            }
        }
        let kl = kl.max(0.0);
        kl_sum += kl;
        kl_max = kl_max.max(kl);
        let next = if t + 1 < n { Some(w.input[t + 1]) } else { None };
        let mut hit = None;
        for j in 0..k {
            let id = w.topk[t * k + j];
            let sym = if hit.is_none() && Some(id) == next {
                hit = Some(j);
                0
            } else {
                u64::from(id) + 1
            };
            IDS.encode(probs, enc, j.min(SLOT_CONTEXTS - 1), sym);
        }
        if next.is_some() {
            let ce = f64::from(w.ce[t]);
            if !ce.is_finite() {
                return err(format!("position {t}: CE is {ce} (only the last position may be NaN)"));
            }
            let u = grid(ce) as i64;
            match hit {
                Some(j) => CE.encode(probs, enc, 0, zigzag(u - grid(-dec[j]) as i64)),
                None => CE.encode(probs, enc, 1, u as u64),
            }
        }
    }
    Ok((kl_sum, kl_max))
}

/// Decode one window of `n` tokens whose models started from `prior` (fresh when None).
pub fn decode_window(data: &[u8], n: usize, p: Params, has_mask: bool, prior: Option<&Prior>) -> Result<WindowOut, CodecError> {
    let k = p.k;
    if k == 0 || k > SLOT_CONTEXTS * 1024 {
        return err(format!("k = {k} is not supported"));
    }
    let max_q = p.max_q();
    let mut dec = Decoder::new(data)?;
    let mut m = Models::new(prior);
    let probs = &mut m.probs;
    let mut out = WindowOut {
        input: Vec::with_capacity(n),
        offsets: Vec::with_capacity(n),
        topk: Vec::with_capacity(n * k),
        logp: Vec::with_capacity(n * k),
        ce: Vec::with_capacity(n),
        mask: None,
    };
    let mut prev = 0i64;
    for _ in 0..n {
        let v = INPUT.decode(probs, &mut dec, 0);
        out.input.push(u32::try_from(v).map_err(|_| CodecError("corrupt data: token rank out of range".into()))?);
        prev += unzigzag(OFFSET.decode(probs, &mut dec, 0));
        out.offsets.push(prev);
    }
    if has_mask {
        let mut ctx = 0usize;
        let mut mask = Vec::with_capacity(n);
        for _ in 0..n {
            let b = dec.bit(&mut probs[MASK + ctx]);
            ctx = usize::from(b);
            mask.push(b);
        }
        out.mask = Some(mask);
    }
    let mut q = vec![0u64; k];
    let mut lp = vec![0f64; k];
    for t in 0..n {
        let u_lse = LSE.decode(probs, &mut dec, 0);
        q[0] = 0;
        for j in 1..k {
            let gap = GAP.decode(probs, &mut dec, j.min(SLOT_CONTEXTS - 1));
            q[j] = q[j - 1].saturating_add(gap);
            if q[j] > max_q {
                return err("corrupt data: a log-prob gap beyond the grid");
            }
        }
        reconstruct(u_lse, &q, &p, &mut lp);
        out.logp.extend(lp.iter().map(|&x| x as f32));
        let next = if t + 1 < n { Some(out.input[t + 1]) } else { None };
        let mut hit = None;
        for j in 0..k {
            let sym = IDS.decode(probs, &mut dec, j.min(SLOT_CONTEXTS - 1));
            let id = if sym == 0 {
                match (next, hit) {
                    (Some(id), None) => {
                        hit = Some(j);
                        id
                    }
                    _ => return err("corrupt data: a next-token reference where none is possible"),
                }
            } else {
                u32::try_from(sym - 1).map_err(|_| CodecError("corrupt data: top-k rank out of range".into()))?
            };
            out.topk.push(id);
        }
        let ce = if next.is_none() {
            f32::NAN
        } else {
            let u = match hit {
                Some(j) => grid(-lp[j]) as i64 + unzigzag(CE.decode(probs, &mut dec, 0)),
                None => CE.decode(probs, &mut dec, 1) as i64,
            };
            (u as f64 * FINE) as f32
        };
        out.ce.push(ce);
    }
    dec.check_end()?;
    for &x in &out.offsets {
        if x < 0 {
            return err("corrupt data: negative character offset");
        }
    }
    Ok(out)
}

/// Offsets in `WindowOut` are relative to the window's char_start; add it back.
pub fn shift_offsets(out: &mut WindowOut, char_start: i64) {
    for x in &mut out.offsets {
        *x += char_start;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Lcg(u64);
    impl Lcg {
        fn next(&mut self) -> u64 {
            self.0 = self.0.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            self.0 >> 33
        }
        fn unit(&mut self) -> f64 {
            self.next() as f64 / (1u64 << 31) as f64
        }
    }

    fn random_window(seed: u64, n: usize, k: usize, mask: bool) -> (Vec<u32>, Vec<i64>, Vec<u32>, Vec<f32>, Vec<f32>, Option<Vec<bool>>) {
        let mut r = Lcg(seed);
        let input: Vec<u32> = (0..n).map(|_| (r.next() % 500) as u32).collect();
        let mut offsets = Vec::new();
        let mut pos = 7i64;
        for _ in 0..n {
            offsets.push(pos);
            pos += (r.next() % 6) as i64;
        }
        let mut topk = Vec::new();
        let mut logp = Vec::new();
        let mut ce = Vec::new();
        for t in 0..n {
            let mut ids: Vec<u32> = Vec::new();
            if t + 1 < n && r.next() % 2 == 0 {
                ids.push(input[t + 1]);
            }
            while ids.len() < k {
                let id = (r.next() % 3000) as u32;
                if !ids.contains(&id) {
                    ids.push(id);
                }
            }
            let mut lps: Vec<f64> = (0..k).map(|_| -r.unit() * 12.0).collect();
            lps.sort_by(|a, b| b.partial_cmp(a).unwrap());
            // a real distribution: the top-k keep a mass between 0.3 and 1
            let shift = logsumexp(&lps) - (0.3 + 0.7 * r.unit()).ln();
            topk.extend(&ids);
            logp.extend(lps.iter().map(|&x| (x - shift) as f32));
            ce.push(if t + 1 < n { (r.unit() * 9.0) as f32 } else { f32::NAN });
        }
        let mask = if mask { Some((0..n).map(|_| r.next() % 3 == 0).collect()) } else { None };
        (input, offsets, topk, logp, ce, mask)
    }

    #[test]
    fn uint_roundtrip() {
        let values: Vec<u64> = vec![0, 1, 2, 3, 15, 16, 17, 255, 256, 1 << 20, (1 << 32) - 1, 123456789];
        let mut enc = Encoder::new();
        let m = UintModel { at: 0 };
        let mut probs = vec![PROB_INIT; 2 * UINT_NODES];
        for (i, &v) in values.iter().enumerate() {
            m.encode(&mut probs, &mut enc, i % 2, v);
            enc.encode_direct(v & 7, 3);
        }
        let bytes = enc.finish();
        let mut dec = Decoder::new(&bytes).unwrap();
        let mut probs = vec![PROB_INIT; 2 * UINT_NODES];
        for (i, &v) in values.iter().enumerate() {
            assert_eq!(m.decode(&mut probs, &mut dec, i % 2), v);
            assert_eq!(dec.direct(3), v & 7);
        }
        dec.check_end().unwrap();
    }

    #[test]
    fn zigzag_roundtrip() {
        for v in [-5i64, -1, 0, 1, 2, 1 << 40, -(1 << 40)] {
            assert_eq!(unzigzag(zigzag(v)), v);
        }
    }

    #[test]
    fn window_roundtrip_is_exact_where_it_should_be() {
        for (seed, n, k, mask) in [(1u64, 50usize, 10usize, false), (2, 1, 5, true), (3, 200, 20, true), (4, 3, 1, false)] {
            let (input, offsets, topk, logp, ce, mask) = random_window(seed, n, k, mask);
            let p = Params { k, step: 0.125, knee: 0.0 };
            let w = WindowIn { input: &input, offsets: &offsets, char_start: 7, topk: &topk, logp: &logp, ce: &ce, mask: mask.as_deref() };
            let e = encode_window(&w, p, None).unwrap();
            let mut out = decode_window(&e.bytes, n, p, mask.is_some(), None).unwrap();
            shift_offsets(&mut out, 7);
            assert_eq!(out.input, input);
            assert_eq!(out.offsets, offsets);
            assert_eq!(out.topk, topk);
            assert_eq!(out.mask, mask);
            for t in 0..n {
                let row = &logp[t * k..(t + 1) * k];
                let lse = logsumexp(&row.iter().map(|&x| f64::from(x)).collect::<Vec<_>>());
                let drow: Vec<f64> = out.logp[t * k..(t + 1) * k].iter().map(|&x| f64::from(x)).collect();
                // the kept mass survives to the 1/1024 grid
                assert!((logsumexp(&drow) - lse).abs() <= FINE, "mass at {t}");
                // each log-prob within half a step of shape error plus the mass grid
                for j in 0..k {
                    assert!((drow[j] - f64::from(row[j])).abs() <= 0.125 + FINE, "logp at {t},{j}");
                }
                if t + 1 < n {
                    assert!((out.ce[t] - ce[t]).abs() <= (FINE / 2.0 + 1e-6) as f32, "ce at {t}");
                } else {
                    assert!(out.ce[t].is_nan());
                }
            }
            assert!(e.kl_sum >= 0.0 && e.kl_max < 0.01);
        }
    }

    #[test]
    fn companded_grid_bounds_each_slot_by_its_distance_from_the_top() {
        let (k, knee, step) = (10usize, 1.0f64, 0.125f64);
        let (input, offsets, topk, logp, ce, _) = random_window(5, 120, k, false);
        let p = Params { k, step, knee };
        let w = WindowIn { input: &input, offsets: &offsets, char_start: 7, topk: &topk, logp: &logp, ce: &ce, mask: None };
        let e = encode_window(&w, p, None).unwrap();
        let out = decode_window(&e.bytes, input.len(), p, false, None).unwrap();
        assert_eq!(out.topk, topk);
        let linear = encode_window(&w, Params { knee: 0.0, ..p }, None).unwrap();
        assert!(e.bytes.len() < linear.bytes.len(), "a wider grid for unlikely slots must cost fewer bytes");
        for t in 0..input.len() {
            let row: Vec<f64> = logp[t * k..(t + 1) * k].iter().map(|&x| f64::from(x)).collect();
            let drow: Vec<f64> = out.logp[t * k..(t + 1) * k].iter().map(|&x| f64::from(x)).collect();
            let (o_lse, d_lse) = (logsumexp(&row), logsumexp(&drow));
            assert!((o_lse - d_lse).abs() <= FINE, "kept mass at {t}");
            for j in 0..k {
                // distances from the top come back within half a grid cell, the cell being
                // step·(1 + d/knee) wide at distance d; the renormalisation adds at most one more cell
                let (d_o, d_d) = (row[0] - row[j], drow[0] - drow[j]);
                let cell = step * (1.0 + d_o.max(d_d) / knee);
                assert!((d_o - d_d).abs() <= 0.5 * cell + 1e-4, "slot {j} at {t}: {d_o} vs {d_d}");
            }
        }
    }

    #[test]
    fn minus_infinity_log_probs_survive() {
        let p = Params { k: 3, step: 0.125, knee: 1.0 };
        let w = WindowIn { input: &[1, 2], offsets: &[0, 1], char_start: 0, topk: &[1, 2, 3, 2, 1, 3], logp: &[-0.1, -2.5, f32::NEG_INFINITY, -0.2, -1.8, f32::NEG_INFINITY], ce: &[2.5, f32::NAN], mask: None };
        let e = encode_window(&w, p, None).unwrap();
        let out = decode_window(&e.bytes, 2, p, false, None).unwrap();
        assert!(out.logp[2] < -1000.0 && out.logp[5] < -1000.0);
        assert!((out.ce[0] - 2.5).abs() < 1e-3);
    }

    #[test]
    fn corrupt_data_is_an_error_not_a_panic() {
        let (input, offsets, topk, logp, ce, _) = random_window(9, 40, 10, false);
        let p = Params { k: 10, step: 0.125, knee: 0.0 };
        let w = WindowIn { input: &input, offsets: &offsets, char_start: 7, topk: &topk, logp: &logp, ce: &ce, mask: None };
        let e = encode_window(&w, p, None).unwrap();
        assert!(decode_window(&e.bytes[..3], 40, p, false, None).is_err());
        assert!(decode_window(&e.bytes[..e.bytes.len() / 2], 40, p, false, None).is_err());
    }

    #[test]
    fn unsorted_or_mismatched_input_is_refused() {
        let p = Params { k: 2, step: 0.125, knee: 0.0 };
        let w = WindowIn { input: &[1, 2], offsets: &[0, 1], char_start: 0, topk: &[1, 2, 3, 4], logp: &[-2.0, -1.0, -1.0, -2.0], ce: &[1.0, f32::NAN], mask: None };
        assert!(encode_window(&w, p, None).unwrap_err().0.contains("sorted"));
        let w = WindowIn { input: &[1, 2], offsets: &[0], char_start: 0, topk: &[1, 2, 3, 4], logp: &[-1.0, -2.0, -1.0, -2.0], ce: &[1.0, f32::NAN], mask: None };
        assert!(encode_window(&w, p, None).is_err());
    }

    #[test]
    fn hand_worked_hit_and_ce() {
        // two tokens; at t = 0 the next token (id 5) is in slot 1 with log-prob −1.5
        let p = Params { k: 2, step: 0.125, knee: 0.0 };
        let w = WindowIn {
            input: &[3, 5],
            offsets: &[0, 4],
            char_start: 0,
            topk: &[9, 5, 5, 9],
            logp: &[-0.5, -1.5, -0.25, -3.0],
            ce: &[1.5, f32::NAN],
            mask: None,
        };
        let e = encode_window(&w, p, None).unwrap();
        let out = decode_window(&e.bytes, 2, p, false, None).unwrap();
        assert_eq!(out.topk, vec![9, 5, 5, 9]);
        // gaps 1.0 and 2.75 are multiples of the step: the log-probs come back to float precision
        for (a, b) in out.logp.iter().zip([-0.5f32, -1.5, -0.25, -3.0]) {
            assert!((a - b).abs() < 2e-3, "{a} vs {b}");
        }
        assert!((out.ce[0] - 1.5).abs() < 1e-3);
        assert!(e.kl_max < 1e-5);
    }

    fn counts_of(windows: &[(Vec<u32>, Vec<i64>, Vec<u32>, Vec<f32>, Vec<f32>, Option<Vec<bool>>)], p: Params) -> Counts {
        let mut c = Counts::default();
        for (input, offsets, topk, logp, ce, mask) in windows {
            let w = WindowIn { input, offsets, char_start: 7, topk, logp, ce, mask: mask.as_deref() };
            count_window(&w, p, &mut c).unwrap();
        }
        c
    }

    #[test]
    fn primed_windows_decode_to_the_same_values_in_fewer_bytes() {
        let (k, p) = (10usize, Params { k: 10, step: 0.125, knee: 0.0 });
        let windows: Vec<_> = (0..60u64).map(|s| random_window(100 + s, 20 + (s as usize % 7), k, s % 2 == 0)).collect();
        let prior = Prior::from_counts(&counts_of(&windows, p));
        let (mut fresh_bytes, mut primed_bytes) = (0usize, 0usize);
        for (input, offsets, topk, logp, ce, mask) in &windows {
            let w = WindowIn { input, offsets, char_start: 7, topk, logp, ce, mask: mask.as_deref() };
            let fresh = encode_window(&w, p, None).unwrap();
            let primed = encode_window(&w, p, Some(&prior)).unwrap();
            let n = input.len();
            // the prior changes how the symbols are coded, not which: the decoded values are the same
            let a = decode_window(&fresh.bytes, n, p, mask.is_some(), None).unwrap();
            let b = decode_window(&primed.bytes, n, p, mask.is_some(), Some(&prior)).unwrap();
            assert_eq!(a.input, b.input);
            assert_eq!(a.offsets, b.offsets);
            assert_eq!(a.topk, b.topk);
            assert_eq!(a.mask, b.mask);
            assert_eq!(a.logp, b.logp);
            assert_eq!(a.ce.iter().map(|x| x.to_bits()).collect::<Vec<_>>(), b.ce.iter().map(|x| x.to_bits()).collect::<Vec<_>>());
            assert_eq!(b.input, *input);
            assert_eq!(b.topk, *topk);
            assert_eq!((fresh.kl_sum, fresh.kl_max), (primed.kl_sum, primed.kl_max));
            fresh_bytes += fresh.bytes.len();
            primed_bytes += primed.bytes.len();
        }
        // short windows no longer pay for learning the models
        assert!((primed_bytes as f64) < 0.85 * fresh_bytes as f64, "primed {primed_bytes} vs fresh {fresh_bytes}");
    }

    #[test]
    fn counts_add_up_in_any_order() {
        let p = Params { k: 5, step: 0.125, knee: 0.0 };
        let windows: Vec<_> = (0..6u64).map(|s| random_window(s, 30, 5, s == 3)).collect();
        let whole = counts_of(&windows, p);
        let halves = counts_of(&windows[3..], p).merge(counts_of(&windows[..3], p));
        assert_eq!(whole, halves);
        assert!(whole.0.iter().any(|c| c[0] + c[1] > 0));
    }

    #[test]
    fn prior_levels_by_hand() {
        let mut c = Counts::default();
        c.0[0] = [0, 100]; // always 1: P(0) = 0.5/101 → the lowest level, 31/2048
        c.0[1] = [50, 50]; // even → ½
        c.0[2] = [2, 1]; // too few to trust → fresh
        c.0[3] = [90, 10]; // P(0) = 90.5/101 · 2048 = 1835.1: level 49 (1847) is nearer than 48 (1822)
        c.0[4] = [100, 0]; // always 0 → the highest level
        let prior = Prior::from_counts(&c);
        assert_eq!(&prior.levels()[..5], &[0, 32, 32, 49, 64]);
        assert_eq!(&prior.probs[..5], &[31, 1024, 1024, 1847, 2017]);
        assert!(prior.levels()[5..].iter().all(|&l| l == FRESH_LEVEL));
        assert_eq!(Prior::from_levels(prior.levels()).unwrap(), prior);
    }

    #[test]
    fn a_corrupt_or_foreign_prior_is_an_error() {
        let e = Prior::from_levels(&[32u8; 100]).unwrap_err();
        assert!(e.0.contains("100 cells"), "{e}");
        let mut levels = vec![FRESH_LEVEL; MODEL_CELLS];
        levels[17] = 65;
        assert!(Prior::from_levels(&levels).unwrap_err().0.contains("level 65"));
    }

    #[test]
    fn fresh_windows_read_as_topk_rc_1_wrote_them() {
        // bytes written by the "topk-rc/1" encoder (fusekit before the prior) for a 3-token window:
        // a hit at t = 0, a miss at t = 1, a loss mask; they must keep decoding with fresh models
        let bytes = [
            0u8, 10, 0, 114, 72, 241, 171, 183, 56, 126, 231, 86, 142, 111, 32, 27, 179, 151, 127, 58, 142, 84, 189, 251, 235, 96,
        ];
        let p = Params { k: 2, step: 0.125, knee: 0.0 };
        let out = decode_window(&bytes, 3, p, true, None).unwrap();
        assert_eq!(out.input, vec![3, 5, 2]);
        assert_eq!(out.offsets, vec![0, 4, 9]);
        assert_eq!(out.topk, vec![9, 5, 5, 9, 1, 2]);
        assert_eq!(out.mask, Some(vec![true, false, true]));
        for (a, b) in out.logp.iter().zip([-0.5f32, -1.5, -0.25, -3.0, -1.0, -1.0]) {
            assert!((a - b).abs() < 2e-3, "{a} vs {b}");
        }
        assert!((out.ce[0] - 1.5).abs() < 1e-3 && (out.ce[1] - 4.0).abs() < 1e-3 && out.ce[2].is_nan());
    }
}
