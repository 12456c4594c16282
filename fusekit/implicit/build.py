"""Stage 3 (build): the SFT set and the preference pairs, from the scored responses.

Rules (FuseChat-3.0, arXiv 2503.04222, §3: SFT on the best response; DPO pairs drawn within one source
so that a pair differs in quality, not in style):

* SFT: per prompt, the response with the highest reward over all sources. Ties: the shorter response
  (in characters), then the earlier source in the config, then the lower sample index.
* Pairs: per prompt and source, chosen = that source's highest-reward response (ties as above) and
  rejected = its lowest-reward response (ties: the longer, then the lower sample index); the pair
  counts only when chosen − rejected > margin. Of the sources with a pair, the one with the largest
  gap gives the prompt's single pair (ties: the earlier source). Prompts without any such pair (every
  source scored its samples alike) get none.

Responses whose reward is null (the reward function failed) take no part.
"""

from __future__ import annotations

from typing import Sequence

import polars as pl

SFT_SCHEMA = {"prompt_id": pl.String, "source": pl.String, "sample": pl.Int32, "response": pl.String, "reward": pl.Float64}
PAIR_SCHEMA = {
    "prompt_id": pl.String,
    "source": pl.String,
    "chosen": pl.String,
    "rejected": pl.String,
    "chosen_reward": pl.Float64,
    "rejected_reward": pl.Float64,
    "gap": pl.Float64,
    "chosen_sample": pl.Int32,
    "rejected_sample": pl.Int32,
}


def build_sets(responses: pl.DataFrame, prompt_order: Sequence[str], source_order: Sequence[str], margin: float = 0.0) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(sft, pairs) frames in prompt order (SFT_SCHEMA, PAIR_SCHEMA) from scored responses.

    `responses` needs prompt_id, source, sample, response, reward (Float64, null = failed).
    """
    rank = {s: i for i, s in enumerate(source_order)}
    by_prompt: dict[str, list[dict]] = {}
    for row in responses.filter(pl.col("reward").is_not_null()).iter_rows(named=True):
        by_prompt.setdefault(row["prompt_id"], []).append(row)

    def best_key(r: dict):
        return (-r["reward"], len(r["response"]), rank[r["source"]], r["sample"])

    def worst_key(r: dict):
        return (r["reward"], -len(r["response"]), r["sample"])

    sft, pairs = [], []
    for pid in prompt_order:
        rows = by_prompt.get(pid)
        if not rows:
            continue
        b = min(rows, key=best_key)
        sft.append({"prompt_id": pid, "source": b["source"], "sample": b["sample"], "response": b["response"], "reward": b["reward"]})
        candidates = []
        for source in source_order:
            own = [r for r in rows if r["source"] == source]
            if len(own) < 2:
                continue
            c, w = min(own, key=best_key), min(own, key=worst_key)
            gap = c["reward"] - w["reward"]
            if gap > margin:
                candidates.append((-gap, rank[source], c, w, gap))
        if candidates:
            _, _, c, w, gap = min(candidates, key=lambda t: (t[0], t[1]))
            pairs.append({
                "prompt_id": pid, "source": c["source"], "chosen": c["response"], "rejected": w["response"],
                "chosen_reward": c["reward"], "rejected_reward": w["reward"], "gap": gap,
                "chosen_sample": c["sample"], "rejected_sample": w["sample"],
            })
    return pl.DataFrame(sft, schema=SFT_SCHEMA), pl.DataFrame(pairs, schema=PAIR_SCHEMA)


WRPO_SCHEMA = {
    "prompt_id": pl.String,
    "chosen": pl.String,  # y_ws: the SFT row (best over the sources)
    "chosen_self": pl.String,  # y_wt: the SFT model's best own sample
    "rejected": pl.String,  # y_l: the SFT model's worst own sample
    "chosen_reward": pl.Float64,
    "self_reward": pl.Float64,
    "rejected_reward": pl.Float64,
}


def build_wrpo(sft: pl.DataFrame, own: pl.DataFrame, prompt_order: Sequence[str], margin: float = 0.0) -> pl.DataFrame:
    """WRPO triples (WRPO_SCHEMA), arXiv 2412.03187: y_ws = the prompt's SFT response; y_wt / y_l = the
    highest / lowest-reward sample of the SFT model itself (`own`: scored responses; ties as in
    build_sets). A prompt counts when reward(y_ws) − reward(y_l) > margin.
    """
    best = {r["prompt_id"]: r for r in sft.iter_rows(named=True)}
    rows_by_prompt: dict[str, list[dict]] = {}
    for row in own.filter(pl.col("reward").is_not_null()).iter_rows(named=True):
        rows_by_prompt.setdefault(row["prompt_id"], []).append(row)
    out = []
    for pid in prompt_order:
        rows = rows_by_prompt.get(pid)
        if pid not in best or not rows:
            continue
        wt = min(rows, key=lambda r: (-r["reward"], len(r["response"]), r["sample"]))
        lo = min(rows, key=lambda r: (r["reward"], -len(r["response"]), r["sample"]))
        ws = best[pid]
        if ws["reward"] - lo["reward"] > margin:
            out.append({
                "prompt_id": pid, "chosen": ws["response"], "chosen_self": wt["response"], "rejected": lo["response"],
                "chosen_reward": ws["reward"], "self_reward": wt["reward"], "rejected_reward": lo["reward"],
            })
    return pl.DataFrame(out, schema=WRPO_SCHEMA)
