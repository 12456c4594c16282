//! Moving a source model's per-position top-k distributions onto the target's positions.
//!
//! Along a DTW path, a target position j is *carried* when exactly one source position i is aligned
//! to it and the two tokens agree: the source token maps to the target token through the vocabulary
//! map (the map sends an identical string to its target twin, so equal strings agree too). A carried
//! position takes the source's top-k at i, ids translated through the vocabulary map and probabilities
//! renormalised over the kept entries (softmax of the stored log-probs). Source ids that collide after
//! mapping are merged by **summing** their probabilities, so no probability mass is dropped; entries
//! are then ordered by probability (ties: lower target id first) and padded with id −1, prob 0.
//!
//! A position whose source next token maps nowhere (special or padded ids) does not carry either.
//!
//! Every other target position falls back to one-hot on the **next** target token b_{j+1}: the
//! distribution at j predicts j+1 (the FuseLLM reference put the one-hot on b_j, an off-by-one fixed
//! in FuseChat-2.0). The last position has no next token: it gets no entries at all (all −1), the
//! training loss ignores it anyway.

/// A vocabulary-map entry for a source id with no target counterpart (special or padded ids): its
/// probability is dropped before renormalising, and the token never agrees with a target token.
pub const UNMAPPED: u32 = u32::MAX;

/// Result for one (source, target) sequence pair; arrays are row-major [n, k].
#[derive(Debug, Clone, PartialEq)]
pub struct AlignedTopk {
    pub ids: Vec<i32>,
    pub probs: Vec<f32>,
    pub carried: Vec<bool>,
    /// The source position whose distribution was carried, −1 where it fell back.
    pub src_pos: Vec<i32>,
}

#[derive(Debug, PartialEq, Eq)]
pub enum TopkError {
    Path(String),
    Shape(String),
}

impl std::fmt::Display for TopkError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            TopkError::Path(s) | TopkError::Shape(s) => f.write_str(s),
        }
    }
}

pub struct TopkInputs<'a> {
    pub path: &'a [(u32, u32)],
    pub src_ids: &'a [u32],
    pub tgt_ids: &'a [u32],
    pub vocab_map: &'a [u32],
    pub src_topk_ids: &'a [i32],
    pub src_topk_logp: &'a [f32],
    pub k: usize,
}

pub fn align_topk(x: &TopkInputs) -> Result<AlignedTopk, TopkError> {
    let (m, n, k) = (x.src_ids.len(), x.tgt_ids.len(), x.k);
    if x.src_topk_ids.len() != m * k || x.src_topk_logp.len() != m * k {
        return Err(TopkError::Shape(format!(
            "source top-k arrays must have shape ({m}, {k}) to match {m} source tokens"
        )));
    }
    // Count, per target position, the aligned source positions; remember the (last) one.
    let mut count = vec![0u32; n];
    let mut partner = vec![0u32; n];
    for &(i, j) in x.path {
        if i as usize >= m || j as usize >= n {
            return Err(TopkError::Path(format!(
                "path pair ({i}, {j}) is outside the ({m}, {n}) token grid"
            )));
        }
        count[j as usize] += 1;
        partner[j as usize] = i;
    }
    let map = |id: u32| -> Option<u32> { x.vocab_map.get(id as usize).copied() };
    let usable = |t: u32| t != UNMAPPED;
    for &id in x.src_ids {
        if map(id).is_none() {
            return Err(TopkError::Shape(format!(
                "source token id {id} is outside the vocabulary map of size {}",
                x.vocab_map.len()
            )));
        }
    }
    let mut out = AlignedTopk {
        ids: vec![-1; n * k],
        probs: vec![0.0; n * k],
        carried: vec![false; n],
        src_pos: vec![-1; n],
    };
    let mut merged: Vec<(i32, f32)> = Vec::with_capacity(k);
    for j in 0..n {
        let i = partner[j] as usize;
        // The source's own next token must reach the target too: where it maps nowhere (a chat template's
        // role marker, a padded id) the source's row is about a token the target cannot take, and what is
        // left after dropping it is the top-k's noise, renormalised into a confident-looking row.
        let next_maps = x.src_ids.get(i + 1).map_or(true, |&s| map(s).is_some_and(usable));
        let agree = count[j] == 1
            && next_maps
            && map(x.src_ids[i]).is_some_and(usable)
            && map(x.src_ids[i]) == Some(x.tgt_ids[j]);
        let row_ids = &mut out.ids[j * k..(j + 1) * k];
        let row_probs = &mut out.probs[j * k..(j + 1) * k];
        if agree {
            let src_ids = &x.src_topk_ids[i * k..(i + 1) * k];
            let src_logp = &x.src_topk_logp[i * k..(i + 1) * k];
            let max = src_logp
                .iter()
                .zip(src_ids)
                .filter(|(_, &id)| id >= 0)
                .map(|(&lp, _)| lp)
                .fold(f32::NEG_INFINITY, f32::max);
            merged.clear();
            for (&id, &lp) in src_ids.iter().zip(src_logp) {
                if id < 0 || !lp.is_finite() {
                    continue;
                }
                let Some(t) = map(id as u32) else {
                    return Err(TopkError::Shape(format!(
                        "source top-k id {id} is outside the vocabulary map of size {}",
                        x.vocab_map.len()
                    )));
                };
                if !usable(t) {
                    continue;
                }
                let p = (lp - max).exp();
                match merged.iter_mut().find(|(mid, _)| *mid == t as i32) {
                    Some(entry) => entry.1 += p,
                    None => merged.push((t as i32, p)),
                }
            }
            if !merged.is_empty() {
                let total: f32 = merged.iter().map(|(_, p)| p).sum();
                merged.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
                for (slot, (id, p)) in merged.iter().enumerate() {
                    row_ids[slot] = *id;
                    row_probs[slot] = p / total;
                }
                out.carried[j] = true;
                out.src_pos[j] = i as i32;
                continue;
            }
        }
        if j + 1 < n {
            row_ids[0] = x.tgt_ids[j + 1] as i32;
            row_probs[0] = 1.0;
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn carries_matches_and_falls_back_to_next_token() {
        // Target "a b c" (ids 10 11 12); source "a bc" (ids 0 1): path (0,0) (1,1) (1,2).
        // Source "bc" maps to target 12 ("c"): target 1 ("b") disagrees → one-hot on the next
        // target token (12); target 2 ("c") has one partner that agrees → carried.
        let path = [(0, 0), (1, 1), (1, 2)];
        let vocab_map = [10u32, 12, 12, 13];
        let inputs = TopkInputs {
            path: &path,
            src_ids: &[0, 1],
            tgt_ids: &[10, 11, 12],
            vocab_map: &vocab_map,
            // Position 0: ids 1, 3 (→ 12, 13) at p .6, .2. Position 1: ids 1, 2 both → 12 (collide).
            src_topk_ids: &[1, 3, 1, 2],
            src_topk_logp: &[0.6f32.ln(), 0.2f32.ln(), 0.5f32.ln(), 0.1f32.ln()],
            k: 2,
        };
        let out = align_topk(&inputs).unwrap();
        assert_eq!(out.carried, vec![true, false, true]);
        assert_eq!(out.src_pos, vec![0, -1, 1]);
        assert_eq!(&out.ids[0..2], &[12, 13]);
        assert!((out.probs[0] - 0.75).abs() < 1e-6 && (out.probs[1] - 0.25).abs() < 1e-6);
        assert_eq!((&out.ids[2..4], &out.probs[2..4]), (&[12, -1][..], &[1.0f32, 0.0][..]));
        // Collision: both entries land on 12, summed to the whole mass.
        assert_eq!(&out.ids[4..6], &[12, -1]);
        assert!((out.probs[4] - 1.0).abs() < 1e-6);
    }

    #[test]
    fn a_row_whose_next_source_token_maps_nowhere_falls_back() {
        // Source "a <role> b" (ids 0 1 2, <role> unmapped); target "a b" (ids 10 12). Source row 0 predicts
        // <role> with .9 and "b" with .1: dropping <role> would leave "b" at 1.0 — it falls back instead.
        let vocab_map = [10u32, UNMAPPED, 12];
        let inputs = TopkInputs {
            path: &[(0, 0), (1, 1), (2, 1)],
            src_ids: &[0, 1, 2],
            tgt_ids: &[10, 12],
            vocab_map: &vocab_map,
            src_topk_ids: &[1, 2, 2, 0, 0, 2],
            src_topk_logp: &[0.9f32.ln(), 0.1f32.ln(), 0.8f32.ln(), 0.2f32.ln(), 0.5f32.ln(), 0.5f32.ln()],
            k: 2,
        };
        let out = align_topk(&inputs).unwrap();
        assert_eq!(out.carried, vec![false, false]);
        assert_eq!(&out.ids[0..2], &[12, -1]);
        // With the role marker dropped from the text the same row carries.
        let inputs = TopkInputs { path: &[(0, 0), (1, 1)], src_ids: &[0, 2], src_topk_ids: &[2, 0, 0, 2], src_topk_logp: &[0.8f32.ln(), 0.2f32.ln(), 0.5f32.ln(), 0.5f32.ln()], ..inputs };
        let out = align_topk(&inputs).unwrap();
        assert!(out.carried[0]);
    }

    #[test]
    fn last_position_fallback_is_empty_and_bad_path_is_an_error() {
        let inputs = TopkInputs {
            path: &[(0, 0), (0, 1)],
            src_ids: &[0],
            tgt_ids: &[5, 6],
            vocab_map: &[7],
            src_topk_ids: &[0],
            src_topk_logp: &[0.0],
            k: 1,
        };
        let out = align_topk(&inputs).unwrap();
        assert_eq!(out.ids, vec![6, -1]);
        let bad = TopkInputs { path: &[(0, 0), (3, 1)], ..inputs };
        assert!(matches!(align_topk(&bad), Err(TopkError::Path(_))));
    }
}
