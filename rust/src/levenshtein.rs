//! Levenshtein distance over Unicode code points.
//!
//! Two implementations: a plain dynamic programme (the reference, also used for patterns longer than
//! 64 code points) and Myers' bit-parallel algorithm (Hyyrö's formulation for global distance), which
//! is what the alignment and vocabulary-mapping hot paths call: one pattern is prepared once and then
//! compared against many texts at O(len(text)) word operations each.

/// Plain O(|a|·|b|) dynamic programme with one row.
pub fn levenshtein(a: &[char], b: &[char]) -> u32 {
    if a.is_empty() {
        return b.len() as u32;
    }
    if b.is_empty() {
        return a.len() as u32;
    }
    let mut row: Vec<u32> = (0..=b.len() as u32).collect();
    for (i, &ca) in a.iter().enumerate() {
        let mut diag = row[0];
        row[0] = i as u32 + 1;
        for (j, &cb) in b.iter().enumerate() {
            let up = row[j + 1];
            let sub = diag + u32::from(ca != cb);
            let best = sub.min(up + 1).min(row[j] + 1);
            diag = up;
            row[j + 1] = best;
        }
    }
    row[b.len()]
}

/// A pattern prepared for repeated bit-parallel comparisons.
#[derive(Clone, Debug)]
pub struct Pattern {
    chars: Vec<char>,
    /// Match masks for ASCII code points: bit i set where `chars[i] == c`.
    ascii: [u64; 128],
    /// Match masks for the other code points the pattern contains (patterns are short: a scan wins).
    other: Vec<(char, u64)>,
}

impl Pattern {
    pub fn new(chars: &[char]) -> Self {
        let mut ascii = [0u64; 128];
        let mut other: Vec<(char, u64)> = Vec::new();
        if chars.len() <= 64 {
            for (i, &c) in chars.iter().enumerate() {
                let bit = 1u64 << i;
                if (c as u32) < 128 {
                    ascii[c as usize] |= bit;
                } else if let Some(entry) = other.iter_mut().find(|(oc, _)| *oc == c) {
                    entry.1 |= bit;
                } else {
                    other.push((c, bit));
                }
            }
        }
        Pattern { chars: chars.to_vec(), ascii, other }
    }

    pub fn chars(&self) -> &[char] {
        &self.chars
    }

    pub fn len(&self) -> usize {
        self.chars.len()
    }

    pub fn is_empty(&self) -> bool {
        self.chars.is_empty()
    }

    #[inline]
    fn mask(&self, c: char) -> u64 {
        if (c as u32) < 128 {
            self.ascii[c as usize]
        } else {
            self.other.iter().find(|(oc, _)| *oc == c).map_or(0, |(_, m)| *m)
        }
    }

    /// Levenshtein distance between the pattern and `text`.
    #[inline]
    pub fn distance(&self, text: &[char]) -> u32 {
        let m = self.chars.len();
        if m == 0 {
            return text.len() as u32;
        }
        if text.is_empty() {
            return m as u32;
        }
        if m > 64 {
            return levenshtein(&self.chars, text);
        }
        let last = 1u64 << (m - 1);
        let mut pv: u64 = !0;
        let mut mv: u64 = 0;
        let mut score = m as u32;
        for &c in text {
            let eq = self.mask(c);
            let xv = eq | mv;
            let xh = ((eq & pv).wrapping_add(pv) ^ pv) | eq;
            let mut ph = mv | !(xh | pv);
            let mut mh = pv & xh;
            if ph & last != 0 {
                score += 1;
            } else if mh & last != 0 {
                score -= 1;
            }
            // Row 0 of the global-distance matrix grows by one per text character.
            ph = (ph << 1) | 1;
            mh <<= 1;
            pv = mh | !(xv | ph);
            mv = ph & xv;
        }
        score
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn chars(s: &str) -> Vec<char> {
        s.chars().collect()
    }

    #[test]
    fn hand_worked() {
        assert_eq!(levenshtein(&chars("kitten"), &chars("sitting")), 3);
        assert_eq!(levenshtein(&chars(""), &chars("abc")), 3);
        assert_eq!(levenshtein(&chars("flaw"), &chars("lawn")), 2);
        assert_eq!(levenshtein(&chars("héllo"), &chars("hello")), 1);
        assert_eq!(levenshtein(&chars("日本語"), &chars("日本")), 1);
    }

    #[test]
    fn bit_parallel_equals_dp() {
        // A small deterministic generator: no dependency needed for a test.
        let alphabet: Vec<char> = "abcaé日 x".chars().collect();
        let mut state: u64 = 0x9E3779B97F4A7C15;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..5000 {
            let la = (next() % 70) as usize;
            let lb = (next() % 12) as usize;
            let a: Vec<char> = (0..la).map(|_| alphabet[(next() % 8) as usize]).collect();
            let b: Vec<char> = (0..lb).map(|_| alphabet[(next() % 8) as usize]).collect();
            assert_eq!(Pattern::new(&a).distance(&b), levenshtein(&a, &b), "{a:?} {b:?}");
            assert_eq!(Pattern::new(&b).distance(&a), levenshtein(&a, &b), "{b:?} {a:?}");
        }
    }
}
