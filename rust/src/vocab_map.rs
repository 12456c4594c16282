//! Source-vocabulary → target-vocabulary mapping: the identical string where the target has it,
//! otherwise the target string at minimum edit distance (MinED), ties broken by the lowest target index.
//!
//! The reference compares every source string with every target string (~30 CPU-minutes for
//! 50k × 32k). Two exact lower bounds let us skip almost all of those comparisons:
//! |len(a) − len(b)| ≤ lev(a, b), so targets are visited by increasing length difference and the
//! search stops once the difference exceeds the best distance found; and a 64-bit "character class"
//! signature, where a class present in one string and absent from the other costs at least one edit
//! each, so max(popcount(sa & !sb), popcount(sb & !sa)) ≤ lev(a, b). Hash collisions only merge
//! classes, which makes the bound smaller, never wrong.

use crate::levenshtein::Pattern;
use rayon::prelude::*;
use std::collections::HashMap;

fn signature(s: &[char]) -> u64 {
    s.iter().fold(0u64, |acc, &c| {
        let h = (c as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
        acc | (1u64 << (h >> 58))
    })
}

#[inline]
fn class_bound(sa: u64, sb: u64) -> u32 {
    (sa & !sb).count_ones().max((sb & !sa).count_ones())
}

/// Statistics of one mapping, for the alignment report.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct MapStats {
    pub exact: usize,
    pub min_ed: usize,
}

pub struct VocabMapper<'t> {
    tgt: &'t [Vec<char>],
    exact: HashMap<&'t [char], u32>,
    /// Target indices grouped by string length (in code points), ascending within a group.
    by_len: Vec<Vec<u32>>,
    signatures: Vec<u64>,
}

impl<'t> VocabMapper<'t> {
    pub fn new(tgt: &'t [Vec<char>]) -> Self {
        Self::masked(tgt, &vec![true; tgt.len()])
    }

    /// Only targets with `usable[idx]` may be chosen (byte-fallback twins, special tokens are not).
    pub fn masked(tgt: &'t [Vec<char>], usable: &[bool]) -> Self {
        let mut exact = HashMap::with_capacity(tgt.len());
        let max_len = tgt.iter().map(Vec::len).max().unwrap_or(0);
        let mut by_len = vec![Vec::new(); max_len + 1];
        for (idx, t) in tgt.iter().enumerate() {
            if !usable.get(idx).copied().unwrap_or(false) {
                continue;
            }
            exact.entry(t.as_slice()).or_insert(idx as u32);
            by_len[t.len()].push(idx as u32);
        }
        let signatures = tgt.iter().map(|t| signature(t)).collect();
        VocabMapper { tgt, exact, by_len, signatures }
    }

    /// (target index, distance) for one source string. Panics on an empty target vocabulary.
    pub fn map_one(&self, s: &[char]) -> (u32, u32) {
        if let Some(&idx) = self.exact.get(s) {
            return (idx, 0);
        }
        let pattern = Pattern::new(s);
        let sig = signature(s);
        let len = s.len();
        let (mut best_d, mut best_idx) = (u32::MAX, u32::MAX);
        let mut delta = 0usize;
        // Candidates at length difference `delta` can still win while delta ≤ best_d (equal distance
        // with a lower index wins the tie).
        while (delta as u64) <= u64::from(best_d) {
            let below = len.checked_sub(delta);
            let above = if delta == 0 { None } else { Some(len + delta) };
            if below.is_none() && above.map_or(true, |l| l >= self.by_len.len()) {
                break;
            }
            for l in [below, above].into_iter().flatten() {
                let Some(group) = self.by_len.get(l) else { continue };
                for &idx in group {
                    let lower = class_bound(sig, self.signatures[idx as usize]).max(delta as u32);
                    if lower > best_d || (lower == best_d && idx > best_idx) {
                        continue;
                    }
                    let d = pattern.distance(&self.tgt[idx as usize]);
                    if d < best_d || (d == best_d && idx < best_idx) {
                        best_d = d;
                        best_idx = idx;
                    }
                }
            }
            delta += 1;
        }
        (best_idx, best_d)
    }
}

/// Map every source string; `threads` = None uses rayon's global pool.
pub fn map_vocab(src: &[Vec<char>], tgt: &[Vec<char>]) -> (Vec<u32>, MapStats) {
    map_vocab_masked(src, tgt, &vec![true; tgt.len()])
}

/// `map_vocab` choosing only among targets with `usable[idx]`.
pub fn map_vocab_masked(src: &[Vec<char>], tgt: &[Vec<char>], usable: &[bool]) -> (Vec<u32>, MapStats) {
    assert!(usable.iter().any(|&u| u), "map_vocab needs a non-empty target vocabulary");
    let mapper = VocabMapper::masked(tgt, usable);
    let mapped: Vec<(u32, u32)> = src.par_iter().map(|s| mapper.map_one(s)).collect();
    let exact = mapped.iter().filter(|(_, d)| *d == 0).count();
    let stats = MapStats { exact, min_ed: mapped.len() - exact };
    (mapped.into_iter().map(|(i, _)| i).collect(), stats)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::levenshtein::levenshtein;

    fn v(s: &[&str]) -> Vec<Vec<char>> {
        s.iter().map(|t| t.chars().collect()).collect()
    }

    fn brute(src: &[Vec<char>], tgt: &[Vec<char>]) -> Vec<u32> {
        src.iter()
            .map(|s| {
                let mut best = (u32::MAX, 0u32);
                for (i, t) in tgt.iter().enumerate() {
                    let d = levenshtein(s, t);
                    if d < best.0 {
                        best = (d, i as u32);
                    }
                }
                best.1
            })
            .collect()
    }

    #[test]
    fn hand_worked() {
        let tgt = v(&["the", "cat", "ca", "dog", "the"]);
        let src = v(&["the", "cats", "c", "dot", "zzzzzz", ""]);
        let (map, stats) = map_vocab(&src, &tgt);
        // "the" exact → 0 (first of the duplicates); "cats" → "cat" (1); "c" → "ca" (1, lower than
        // "cat" at 2); "dot" → "dog" (1); "zzzzzz" → distance 6 to "the"/"cat"/"dog" (3 + 3)… and 6 to
        // "ca" too: lowest index wins → 0; "" → "ca" (2) beats the three-letter ones.
        assert_eq!(map, vec![0, 1, 2, 3, 0, 2]);
        assert_eq!(stats, MapStats { exact: 1, min_ed: 5 });
    }

    #[test]
    fn pruned_search_equals_brute_force() {
        let alphabet: Vec<char> = "abcdeé x".chars().collect();
        let mut state: u64 = 777;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let mut word = |max: u64| -> Vec<char> {
            let l = (next() % max) as usize;
            (0..l).map(|_| alphabet[(next() % 8) as usize]).collect()
        };
        let tgt: Vec<Vec<char>> = (0..400).map(|_| word(7)).collect();
        let src: Vec<Vec<char>> = (0..400).map(|_| word(9)).collect();
        assert_eq!(map_vocab(&src, &tgt).0, brute(&src, &tgt));
    }
}
