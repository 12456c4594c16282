//! The top-k codec of the extraction store: one window of one model → a few bytes per token.
//!
//! Everything a window holds (input tokens, their character offsets, per position the top-k ids and
//! log-probabilities, the cross-entropy of the next token, an optional loss mask) is written into one
//! byte string by an adaptive binary range coder (the LZMA one: 11-bit probabilities, shift 5). The
//! models start fresh in every window, so any window decodes on its own.
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

    fn bit(&mut self, prob: &mut u16, bit: bool) {
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

    fn direct(&mut self, value: u64, nbits: u32) {
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

/// Unsigned integers in `contexts` independent contexts: bucket tree per context, mantissa per bucket.
struct UintModel {
    buckets: Vec<u16>, // contexts × 2^BUCKET_BITS tree nodes
    mant: Vec<u16>,    // contexts × 65 buckets × 2^MANT_BITS tree nodes
}

impl UintModel {
    fn new(contexts: usize) -> Self {
        UintModel {
            buckets: vec![PROB_INIT; contexts << BUCKET_BITS],
            mant: vec![PROB_INIT; contexts * 65 << MANT_BITS],
        }
    }

    fn encode(&mut self, enc: &mut Encoder, ctx: usize, v: u64) {
        let b = 64 - v.leading_zeros(); // bit length: 0 for v = 0
        let tree = &mut self.buckets[ctx << BUCKET_BITS..(ctx + 1) << BUCKET_BITS];
        let mut node = 1usize;
        for i in (0..BUCKET_BITS).rev() {
            let bit = (b >> i) & 1 == 1;
            enc.bit(&mut tree[node], bit);
            node = node * 2 + usize::from(bit);
        }
        if b <= 1 {
            return;
        }
        let nbits = b - 1;
        let m = v - (1u64 << nbits);
        let top = nbits.min(MANT_BITS);
        let hi = m >> (nbits - top);
        let base = (ctx * 65 + b as usize) << MANT_BITS;
        let mut node = 1usize;
        for i in (0..top).rev() {
            let bit = (hi >> i) & 1 == 1;
            enc.bit(&mut self.mant[base + node], bit);
            node = node * 2 + usize::from(bit);
        }
        enc.direct(m & ((1u64 << (nbits - top)) - 1), nbits - top);
    }

    fn decode(&mut self, dec: &mut Decoder, ctx: usize) -> u64 {
        let tree = &mut self.buckets[ctx << BUCKET_BITS..(ctx + 1) << BUCKET_BITS];
        let mut node = 1usize;
        for _ in 0..BUCKET_BITS {
            let bit = dec.bit(&mut tree[node]);
            node = node * 2 + usize::from(bit);
        }
        let b = (node - (1 << BUCKET_BITS)) as u32;
        if b <= 1 {
            return u64::from(b);
        }
        let b = b.min(64);
        let nbits = b - 1;
        let top = nbits.min(MANT_BITS);
        let base = (ctx * 65 + b as usize) << MANT_BITS;
        let mut node = 1usize;
        for _ in 0..top {
            let bit = dec.bit(&mut self.mant[base + node]);
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

/// All adaptive state of one window; the same sequence of calls in encoder and decoder.
struct Models {
    input: UintModel,
    offset: UintModel,
    lse: UintModel,
    gap: UintModel,
    ids: UintModel,
    ce: UintModel, // ctx 0: residual after a hit, ctx 1: CE of a next token outside the top-k
    mask: [u16; 2],
}

impl Models {
    fn new() -> Self {
        Models {
            input: UintModel::new(1),
            offset: UintModel::new(1),
            lse: UintModel::new(1),
            gap: UintModel::new(SLOT_CONTEXTS),
            ids: UintModel::new(SLOT_CONTEXTS),
            ce: UintModel::new(2),
            mask: [PROB_INIT; 2],
        }
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

pub fn encode_window(w: &WindowIn, p: Params) -> Result<Encoded, CodecError> {
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
    let mut enc = Encoder::new();
    let mut m = Models::new();
    let mut prev = w.char_start;
    for t in 0..n {
        m.input.encode(&mut enc, 0, u64::from(w.input[t]));
        m.offset.encode(&mut enc, 0, zigzag(w.offsets[t] - prev));
        prev = w.offsets[t];
    }
    if let Some(mask) = w.mask {
        let mut ctx = 0usize;
        for &b in mask {
            enc.bit(&mut m.mask[ctx], b);
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
        m.lse.encode(&mut enc, 0, u_lse);
        for j in 0..k {
            let rel = p.to_grid(orig[0] - orig[j]);
            q[j] = if rel.is_finite() { (rel.round() as u64).min(max_q) } else { max_q };
        }
        for j in 1..k {
            m.gap.encode(&mut enc, j.min(SLOT_CONTEXTS - 1), q[j] - q[j - 1]);
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
            m.ids.encode(&mut enc, j.min(SLOT_CONTEXTS - 1), sym);
        }
        if next.is_some() {
            let ce = f64::from(w.ce[t]);
            if !ce.is_finite() {
                return err(format!("position {t}: CE is {ce} (only the last position may be NaN)"));
            }
            let u = grid(ce) as i64;
            match hit {
                Some(j) => m.ce.encode(&mut enc, 0, zigzag(u - grid(-dec[j]) as i64)),
                None => m.ce.encode(&mut enc, 1, u as u64),
            }
        }
    }
    Ok(Encoded { bytes: enc.finish(), kl_sum, kl_max })
}

pub fn decode_window(data: &[u8], n: usize, p: Params, has_mask: bool) -> Result<WindowOut, CodecError> {
    let k = p.k;
    if k == 0 || k > SLOT_CONTEXTS * 1024 {
        return err(format!("k = {k} is not supported"));
    }
    let max_q = p.max_q();
    let mut dec = Decoder::new(data)?;
    let mut m = Models::new();
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
        let v = m.input.decode(&mut dec, 0);
        out.input.push(u32::try_from(v).map_err(|_| CodecError("corrupt data: token rank out of range".into()))?);
        prev += unzigzag(m.offset.decode(&mut dec, 0));
        out.offsets.push(prev);
    }
    if has_mask {
        let mut ctx = 0usize;
        let mut mask = Vec::with_capacity(n);
        for _ in 0..n {
            let b = dec.bit(&mut m.mask[ctx]);
            ctx = usize::from(b);
            mask.push(b);
        }
        out.mask = Some(mask);
    }
    let mut q = vec![0u64; k];
    let mut lp = vec![0f64; k];
    for t in 0..n {
        let u_lse = m.lse.decode(&mut dec, 0);
        q[0] = 0;
        for j in 1..k {
            let gap = m.gap.decode(&mut dec, j.min(SLOT_CONTEXTS - 1));
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
            let sym = m.ids.decode(&mut dec, j.min(SLOT_CONTEXTS - 1));
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
                Some(j) => grid(-lp[j]) as i64 + unzigzag(m.ce.decode(&mut dec, 0)),
                None => m.ce.decode(&mut dec, 1) as i64,
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
        let mut m = UintModel::new(2);
        for (i, &v) in values.iter().enumerate() {
            m.encode(&mut enc, i % 2, v);
            enc.direct(v & 7, 3);
        }
        let bytes = enc.finish();
        let mut dec = Decoder::new(&bytes).unwrap();
        let mut m = UintModel::new(2);
        for (i, &v) in values.iter().enumerate() {
            assert_eq!(m.decode(&mut dec, i % 2), v);
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
            let e = encode_window(&w, p).unwrap();
            let mut out = decode_window(&e.bytes, n, p, mask.is_some()).unwrap();
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
        let e = encode_window(&w, p).unwrap();
        let out = decode_window(&e.bytes, input.len(), p, false).unwrap();
        assert_eq!(out.topk, topk);
        let linear = encode_window(&w, Params { knee: 0.0, ..p }).unwrap();
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
        let e = encode_window(&w, p).unwrap();
        let out = decode_window(&e.bytes, 2, p, false).unwrap();
        assert!(out.logp[2] < -1000.0 && out.logp[5] < -1000.0);
        assert!((out.ce[0] - 2.5).abs() < 1e-3);
    }

    #[test]
    fn corrupt_data_is_an_error_not_a_panic() {
        let (input, offsets, topk, logp, ce, _) = random_window(9, 40, 10, false);
        let p = Params { k: 10, step: 0.125, knee: 0.0 };
        let w = WindowIn { input: &input, offsets: &offsets, char_start: 7, topk: &topk, logp: &logp, ce: &ce, mask: None };
        let e = encode_window(&w, p).unwrap();
        assert!(decode_window(&e.bytes[..3], 40, p, false).is_err());
        assert!(decode_window(&e.bytes[..e.bytes.len() / 2], 40, p, false).is_err());
    }

    #[test]
    fn unsorted_or_mismatched_input_is_refused() {
        let p = Params { k: 2, step: 0.125, knee: 0.0 };
        let w = WindowIn { input: &[1, 2], offsets: &[0, 1], char_start: 0, topk: &[1, 2, 3, 4], logp: &[-2.0, -1.0, -1.0, -2.0], ce: &[1.0, f32::NAN], mask: None };
        assert!(encode_window(&w, p).unwrap_err().0.contains("sorted"));
        let w = WindowIn { input: &[1, 2], offsets: &[0], char_start: 0, topk: &[1, 2, 3, 4], logp: &[-1.0, -2.0, -1.0, -2.0], ce: &[1.0, f32::NAN], mask: None };
        assert!(encode_window(&w, p).is_err());
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
        let e = encode_window(&w, p).unwrap();
        let out = decode_window(&e.bytes, 2, p, false).unwrap();
        assert_eq!(out.topk, vec![9, 5, 5, 9]);
        // gaps 1.0 and 2.75 are multiples of the step: the log-probs come back to float precision
        for (a, b) in out.logp.iter().zip([-0.5f32, -1.5, -0.25, -3.0]) {
            assert!((a - b).abs() < 2e-3, "{a} vs {b}");
        }
        assert!((out.ce[0] - 1.5).abs() < 1e-3);
        assert!(e.kl_max < 1e-5);
    }
}
