//! Dynamic-programming (DTW) token alignment of two tokenisations of the same text.
//!
//! cost(i, j) = Levenshtein(a_i, b_j); D[0,0] = 0, D[i,0] = D[0,j] = ∞ otherwise;
//! D[i,j] = cost(i,j) + min(D[i−1,j−1], D[i−1,j], D[i,j−1]); backtrack from (m, n) to (1, 1)
//! preferring, on ties, the diagonal, then (i−1, j), then (i, j−1).
//!
//! The backtrack at (i, j) compares exactly the three predecessors that the forward pass minimised
//! over when it filled D[i, j], so recording the forward argmin (same tie order) gives the same path
//! as backtracking over D, with two rolling rows instead of the whole matrix.

use crate::levenshtein::Pattern;
use std::collections::HashMap;

const DIAG: u8 = 0;
const UP: u8 = 1;
const LEFT: u8 = 2;
const INF: u64 = u64::MAX / 4;

/// Distinct tokens of a sequence and, per position, the index of its distinct token.
fn distinct(tokens: &[Vec<char>]) -> (Vec<&[char]>, Vec<u32>) {
    let mut index: HashMap<&[char], u32> = HashMap::with_capacity(tokens.len());
    let mut uniq: Vec<&[char]> = Vec::new();
    let ids = tokens
        .iter()
        .map(|t| {
            *index.entry(t.as_slice()).or_insert_with(|| {
                uniq.push(t.as_slice());
                (uniq.len() - 1) as u32
            })
        })
        .collect();
    (uniq, ids)
}

/// Align source tokens `a` (m) with target tokens `b` (n). Returns 0-based (i, j) pairs from (0, 0)
/// to (m−1, n−1) in increasing order. Both sequences must be non-empty.
///
/// Tokens repeat a lot within a text (spaces, punctuation, common words), so the edit distances are
/// computed once per distinct (source, target) token pair and the DP reads them from a small table.
pub fn align(a: &[Vec<char>], b: &[Vec<char>]) -> Vec<(u32, u32)> {
    let (m, n) = (a.len(), b.len());
    assert!(m > 0 && n > 0, "align needs two non-empty token sequences");
    let (ua, ia) = distinct(a);
    let (ub, ib) = distinct(b);
    let mut costs = vec![0u32; ua.len() * ub.len()];
    for (r, tok) in ua.iter().enumerate() {
        let pattern = Pattern::new(tok);
        for (c, other) in ub.iter().enumerate() {
            costs[r * ub.len() + c] = pattern.distance(other);
        }
    }
    let mut moves = vec![0u8; m * n];
    let mut prev = vec![INF; n + 1];
    let mut cur = vec![INF; n + 1];
    prev[0] = 0;
    for i in 1..=m {
        let cost_row = &costs[ia[i - 1] as usize * ub.len()..(ia[i - 1] as usize + 1) * ub.len()];
        cur[0] = INF;
        let row = &mut moves[(i - 1) * n..i * n];
        for j in 1..=n {
            let (diag, up, left) = (prev[j - 1], prev[j], cur[j - 1]);
            let (best, mv) = if diag <= up && diag <= left {
                (diag, DIAG)
            } else if up <= left {
                (up, UP)
            } else {
                (left, LEFT)
            };
            row[j - 1] = mv;
            cur[j] = best + u64::from(cost_row[ib[j - 1] as usize]);
        }
        std::mem::swap(&mut prev, &mut cur);
    }
    let mut path = Vec::with_capacity(m + n);
    let (mut i, mut j) = (m, n);
    loop {
        path.push(((i - 1) as u32, (j - 1) as u32));
        if i == 1 && j == 1 {
            break;
        }
        match moves[(i - 1) * n + (j - 1)] {
            DIAG => {
                i -= 1;
                j -= 1;
            }
            UP => i -= 1,
            _ => j -= 1,
        }
    }
    path.reverse();
    path
}

/// The same DP, filling the whole cost matrix and backtracking over it: the obviously-correct form,
/// kept for tests.
#[cfg(test)]
pub fn align_reference(a: &[Vec<char>], b: &[Vec<char>]) -> Vec<(u32, u32)> {
    use crate::levenshtein::levenshtein;
    let (m, n) = (a.len(), b.len());
    let mut d = vec![vec![INF; n + 1]; m + 1];
    d[0][0] = 0;
    for i in 1..=m {
        for j in 1..=n {
            let best = d[i - 1][j - 1].min(d[i - 1][j]).min(d[i][j - 1]);
            d[i][j] = best + u64::from(levenshtein(&a[i - 1], &b[j - 1]));
        }
    }
    let mut path = vec![];
    let (mut i, mut j) = (m, n);
    while i >= 1 && j >= 1 {
        path.push(((i - 1) as u32, (j - 1) as u32));
        if i == 1 && j == 1 {
            break;
        }
        let (diag, up, left) = (d[i - 1][j - 1], d[i - 1][j], d[i][j - 1]);
        if diag <= up && diag <= left {
            i -= 1;
            j -= 1;
        } else if up <= left {
            i -= 1;
        } else {
            j -= 1;
        }
    }
    path.reverse();
    path
}

#[cfg(test)]
mod tests {
    use super::*;

    fn toks(s: &[&str]) -> Vec<Vec<char>> {
        s.iter().map(|t| t.chars().collect()).collect()
    }

    #[test]
    fn identical_sequences_align_diagonally() {
        let a = toks(&["the", " cat", " sat"]);
        assert_eq!(align(&a, &a), vec![(0, 0), (1, 1), (2, 2)]);
    }

    #[test]
    fn split_token_aligns_many_to_one() {
        // "hello" vs "hel" "lo": D = [[2, 3]] → path (0,0),(0,1).
        let a = toks(&["hello"]);
        let b = toks(&["hel", "lo"]);
        assert_eq!(align(&a, &b), vec![(0, 0), (0, 1)]);
        assert_eq!(align(&b, &a), vec![(0, 0), (1, 0)]);
    }

    #[test]
    fn rolling_rows_equal_full_matrix() {
        let alphabet: Vec<&str> = vec!["a", "b", "ab", "ba", "", "é", " a", "abc"];
        let mut state: u64 = 12345;
        let mut next = || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..500 {
            let m = 1 + (next() % 12) as usize;
            let n = 1 + (next() % 12) as usize;
            let a: Vec<Vec<char>> = (0..m).map(|_| alphabet[(next() % 8) as usize].chars().collect()).collect();
            let b: Vec<Vec<char>> = (0..n).map(|_| alphabet[(next() % 8) as usize].chars().collect()).collect();
            assert_eq!(align(&a, &b), align_reference(&a, &b));
        }
    }
}
