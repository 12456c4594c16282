//! One text through the whole byte-span transfer, the unit `fusekit align` runs in parallel: byte spans
//! of both tokenizations (`spans.rs`), the source's spans carried into the target's text when the two
//! models rendered it differently (chat templates), the transfer of the source's top-k (`transfer.rs`)
//! and, for the report, the same transfer of a perfect source's top-k (`perfect.rs`) reduced to which
//! target positions it recalls.

use crate::perfect::perfect_topk_ids;
use crate::spans::{byte_spans, remap_spans};
use crate::transfer::{transfer_parallel, SourceVocab, TargetVocab, TransferInputs, Transferred};

/// Where a tokenization's tokens lie: character start offsets (spans derived here) or byte spans.
pub enum Positions {
    Starts(Vec<i64>),
    Spans(Vec<(u32, u32)>),
}

/// The perfect source of the recall check: `perfect_source_topk(src_ids, k, V_s, seed)`'s ids with
/// log-probability `logp_true` on the true next token (column 0) and `logp_other` on the others.
#[derive(Clone, Copy)]
pub struct Perfect {
    pub seed: u64,
    pub k: usize,
    pub logp_true: f32,
    pub logp_other: f32,
}

/// One text: the target's rendering (`text`), the source's when it differs, both tokenizations and the
/// source's top-k rows ([m, k] row-major; `true_logp` [m] or empty, as in `TransferInputs`).
pub struct TextJob {
    pub text: Vec<u8>,
    pub src_text: Option<Vec<u8>>,
    pub src_ids: Vec<u32>,
    pub src_pos: Positions,
    pub tgt_ids: Vec<u32>,
    pub tgt_pos: Positions,
    pub topk_ids: Vec<i32>,
    pub topk_logp: Vec<f32>,
    pub true_logp: Vec<f32>,
    pub k: usize,
    pub perfect: Option<Perfect>,
}

pub struct TextResult {
    pub transfer: Transferred,
    /// Per predicted target position (n − 1), whether the perfect source's transferred row puts ≥ ½ on
    /// the next target token (`recall.recalled`); None without a perfect source.
    pub recalled: Option<Vec<bool>>,
}

fn spans_of(text: &[u8], ids: &[u32], pos: &Positions, table: &[Vec<u8>], what: &str) -> Result<Vec<(u32, u32)>, String> {
    match pos {
        Positions::Spans(s) => Ok(s.clone()),
        Positions::Starts(starts) => {
            let mut tokens: Vec<&[u8]> = Vec::with_capacity(ids.len());
            for &id in ids {
                let t = table.get(id as usize).ok_or_else(|| format!("{what} id {id} is outside its vocabulary of {}", table.len()))?;
                tokens.push(t);
            }
            let spans = byte_spans(text, starts, &tokens).map_err(|e| format!("{what} tokens: {e}"))?;
            to_u32(&spans, what)
        }
    }
}

fn to_u32(spans: &[(usize, usize)], what: &str) -> Result<Vec<(u32, u32)>, String> {
    spans
        .iter()
        .map(|&(s, e)| match (u32::try_from(s), u32::try_from(e)) {
            (Ok(s), Ok(e)) => Ok((s, e)),
            _ => Err(format!("{what} span ({s}, {e}) lies past 4 GiB")),
        })
        .collect()
}

/// Byte spans of both tokenizations in the target's text: (source, target).
pub fn text_spans(job: &TextJob, src: &SourceVocab, tgt: &TargetVocab) -> Result<(Vec<(u32, u32)>, Vec<(u32, u32)>), String> {
    let tgt_spans = spans_of(&job.text, &job.tgt_ids, &job.tgt_pos, &tgt.tokens, "target")?;
    let own = job.src_text.as_deref().unwrap_or(&job.text);
    let mut src_spans = spans_of(own, &job.src_ids, &job.src_pos, &src.tokens, "source")?;
    if own != job.text.as_slice() {
        let wide: Vec<(usize, usize)> = src_spans.iter().map(|&(s, e)| (s as usize, e as usize)).collect();
        src_spans = to_u32(&remap_spans(own, &job.text, &wide), "source")?;
    }
    Ok((src_spans, tgt_spans))
}

/// Positions whose row puts ≥ ½ on the next target token ([n − 1]; empty below two tokens). Ids are
/// distinct within a row, so the mass on the next token is one entry.
pub fn recalled(out: &Transferred, tgt_ids: &[u32], out_k: usize) -> Vec<bool> {
    let n = tgt_ids.len();
    (0..n.saturating_sub(1))
        .map(|j| {
            let next = tgt_ids[j + 1] as i32;
            let row = j * out_k..(j + 1) * out_k;
            out.carried[j] && out.ids[row.clone()].iter().zip(&out.probs[row]).any(|(&id, &p)| id == next && p >= 0.5)
        })
        .collect()
}

fn inputs<'a>(job: &'a TextJob, spans: &'a (Vec<(u32, u32)>, Vec<(u32, u32)>), topk: (&'a [i32], &'a [f32], &'a [f32]), k: usize, out_k: usize) -> TransferInputs<'a> {
    TransferInputs {
        text: &job.text,
        src_ids: &job.src_ids,
        src_spans: &spans.0,
        tgt_ids: &job.tgt_ids,
        tgt_spans: &spans.1,
        src_topk_ids: topk.0,
        src_topk_logp: topk.1,
        src_true_logp: topk.2,
        k,
        out_k,
    }
}

/// The whole text: spans, transfer and (with `job.perfect`) the perfect source's recall, the rows of
/// both transfers in parallel (`transfer_parallel`) on the current rayon pool.
pub fn run_text(job: &TextJob, src: &SourceVocab, tgt: &TargetVocab, out_k: usize) -> Result<TextResult, String> {
    let spans = text_spans(job, src, tgt)?;
    let real = || transfer_parallel(&inputs(job, &spans, (&job.topk_ids, &job.topk_logp, &job.true_logp), job.k, out_k), src, tgt).map_err(|e| e.0);
    let check = || -> Result<Option<Vec<bool>>, String> {
        let Some(p) = job.perfect else { return Ok(None) };
        let ids: Vec<i32> = perfect_topk_ids(&job.src_ids, p.k, src.tokens.len() as u64, p.seed)
            .into_iter()
            .map(|v| i32::try_from(v).unwrap_or(-1))
            .collect();
        let mut logp = vec![p.logp_other; ids.len()];
        logp.iter_mut().step_by(p.k.max(1)).for_each(|v| *v = p.logp_true);
        let out = transfer_parallel(&inputs(job, &spans, (&ids, &logp, &[]), p.k, out_k), src, tgt).map_err(|e| format!("perfect source: {}", e.0))?;
        Ok(Some(recalled(&out, &job.tgt_ids, out_k)))
    };
    let (real, recall) = rayon::join(real, check);
    Ok(TextResult { transfer: real?, recalled: recall? })
}
