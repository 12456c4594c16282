//! The perfect source's top-k ids (perfect-source recall), drawn exactly as
//! `fusekit.align.recall.perfect_source_topk` draws them with numpy.
//!
//! Recall figures are part of every aligned store's sidecars and report, so the draws must be numpy's, bit
//! for bit: `np.random.default_rng(seed)` is `PCG64(SeedSequence(seed))`, and `rng.integers(0, V, size)`
//! (int64, V − 1 < 2³²) is Lemire's bounded rejection on the generator's buffered 32-bit outputs. The
//! constants and steps below follow numpy's `bit_generator.pyx` (SeedSequence), `pcg64.h` (PCG64 XSL-RR)
//! and `distributions.c` (`buffered_bounded_lemire_uint32`); the tests compare with numpy's own numbers.

const INIT_A: u32 = 0x43b0_d7e5;
const MULT_A: u32 = 0x931e_8875;
const INIT_B: u32 = 0x8b51_f9dd;
const MULT_B: u32 = 0x58f3_8ded;
const MIX_MULT_L: u32 = 0xca01_f9dd;
const MIX_MULT_R: u32 = 0x4973_f715;
const XSHIFT: u32 = 16;
const POOL_SIZE: usize = 4;
const PCG_MULT: u128 = (2_549_297_995_355_413_924u128 << 64) + 4_865_540_595_714_422_341u128;

fn hashmix(value: u32, hash_const: &mut u32) -> u32 {
    let mut v = value ^ *hash_const;
    *hash_const = hash_const.wrapping_mul(MULT_A);
    v = v.wrapping_mul(*hash_const);
    v ^ (v >> XSHIFT)
}

fn mix(x: u32, y: u32) -> u32 {
    let r = MIX_MULT_L.wrapping_mul(x).wrapping_sub(MIX_MULT_R.wrapping_mul(y));
    r ^ (r >> XSHIFT)
}

/// numpy's `SeedSequence(seed).generate_state(4, np.uint64)`.
fn seed_state(seed: u64) -> [u64; 4] {
    // The seed as little-endian 32-bit words (0 is one word).
    let entropy: Vec<u32> = if seed >> 32 == 0 { vec![seed as u32] } else { vec![seed as u32, (seed >> 32) as u32] };
    let mut pool = [0u32; POOL_SIZE];
    let mut hc = INIT_A;
    for (i, p) in pool.iter_mut().enumerate() {
        *p = hashmix(entropy.get(i).copied().unwrap_or(0), &mut hc);
    }
    for src in 0..POOL_SIZE {
        for dst in 0..POOL_SIZE {
            if src != dst {
                pool[dst] = mix(pool[dst], hashmix(pool[src], &mut hc));
            }
        }
    }
    // (No entropy words beyond the pool size: a u64 seed has at most two.)
    let mut words = [0u32; 8];
    let mut hb = INIT_B;
    for (i, w) in words.iter_mut().enumerate() {
        let mut v = pool[i % POOL_SIZE] ^ hb;
        hb = hb.wrapping_mul(MULT_B);
        v = v.wrapping_mul(hb);
        *w = v ^ (v >> XSHIFT);
    }
    let mut out = [0u64; 4];
    for (i, o) in out.iter_mut().enumerate() {
        *o = u64::from(words[2 * i]) | (u64::from(words[2 * i + 1]) << 32);
    }
    out
}

/// numpy's PCG64 bit generator (XSL-RR output) with its 32-bit buffer.
pub struct Pcg64 {
    state: u128,
    inc: u128,
    buffered: Option<u32>,
}

impl Pcg64 {
    /// `np.random.default_rng(seed).bit_generator`.
    pub fn from_seed(seed: u64) -> Self {
        let s = seed_state(seed);
        let initstate = (u128::from(s[0]) << 64) | u128::from(s[1]);
        let initseq = (u128::from(s[2]) << 64) | u128::from(s[3]);
        let mut g = Pcg64 { state: 0, inc: (initseq << 1) | 1, buffered: None };
        g.step();
        g.state = g.state.wrapping_add(initstate);
        g.step();
        g
    }

    fn step(&mut self) {
        self.state = self.state.wrapping_mul(PCG_MULT).wrapping_add(self.inc);
    }

    pub fn next_u64(&mut self) -> u64 {
        self.step();
        let s = self.state;
        (((s >> 64) as u64) ^ (s as u64)).rotate_right((s >> 122) as u32)
    }

    pub fn next_u32(&mut self) -> u32 {
        if let Some(v) = self.buffered.take() {
            return v;
        }
        let next = self.next_u64();
        self.buffered = Some((next >> 32) as u32);
        next as u32
    }

    /// One draw of `integers(0, high)` for 1 ≤ high ≤ 2³² (numpy's Lemire rejection on 32-bit draws).
    pub fn below(&mut self, high: u64) -> u64 {
        let rng = high - 1;
        if rng == 0 {
            return 0;
        }
        if rng == u64::from(u32::MAX) {
            return u64::from(self.next_u32());
        }
        let rng = rng as u32;
        let excl = rng + 1;
        let mut m = u64::from(self.next_u32()) * u64::from(excl);
        let mut leftover = m as u32;
        if leftover < excl {
            let threshold = (u32::MAX - rng) % excl;
            while leftover < threshold {
                m = u64::from(self.next_u32()) * u64::from(excl);
                leftover = m as u32;
            }
        }
        m >> 32
    }
}

/// The perfect source's top-k ids [m, k] (row-major) over its tokens `ids`, as
/// `perfect_source_topk(ids, k, vocab_size, seed)` draws them: column 0 the next token (the last row a
/// random id), then k − 1 random ids a row, redrawn (up to 8 rounds) where they equal an id before them.
/// `vocab_size` must lie in 1..=2³².
pub fn perfect_topk_ids(ids: &[u32], k: usize, vocab_size: u64, seed: u64) -> Vec<i64> {
    let m = ids.len();
    let mut g = Pcg64::from_seed(seed);
    let mut out = vec![0i64; m * k];
    if m == 0 || k == 0 {
        return out;
    }
    for i in 0..m - 1 {
        out[i * k] = i64::from(ids[i + 1]);
    }
    out[(m - 1) * k] = g.below(vocab_size) as i64;
    for c in 1..k {
        for i in 0..m {
            out[i * k + c] = g.below(vocab_size) as i64;
        }
    }
    let mut clash = vec![false; m * k];
    for _ in 0..8 {
        let mut any = false;
        for i in 0..m {
            let row = &out[i * k..(i + 1) * k];
            for c in 1..k {
                let hit = row[..c].contains(&row[c]);
                clash[i * k + c] = hit;
                any |= hit;
            }
        }
        if !any {
            break;
        }
        // numpy fills the clashing cells in row-major order from one draw of their count.
        for (cell, &hit) in out.iter_mut().zip(&clash) {
            if hit {
                *cell = g.below(vocab_size) as i64;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// np.random.SeedSequence(0).generate_state(4, np.uint64)
    #[test]
    fn seed_sequence_as_numpy() {
        assert_eq!(seed_state(0), [15793235383387715774, 12390638538380655177, 2361836109651742017, 3188717715514472916]);
    }

    /// np.random.default_rng(7).bit_generator.random_raw(2)
    #[test]
    fn pcg64_as_numpy() {
        let mut g = Pcg64::from_seed(7);
        assert_eq!([g.next_u64(), g.next_u64()], [11530976094092348043, 16550673365885938325]);
    }

    /// r = np.random.default_rng(0); r.integers(0, 8000, 5), r.integers(0, 8000, 3);
    /// np.random.default_rng(123456789012).integers(0, 50000, 4)
    #[test]
    fn bounded_integers_as_numpy() {
        let mut g = Pcg64::from_seed(0);
        let got: Vec<u64> = (0..8).map(|_| g.below(8000)).collect();
        assert_eq!(got, vec![6804, 5095, 4089, 2158, 2462, 327, 601, 132]);
        let mut g = Pcg64::from_seed(123_456_789_012);
        let got: Vec<u64> = (0..4).map(|_| g.below(50000)).collect();
        assert_eq!(got, vec![47621, 28303, 33764, 4183]);
    }
}
