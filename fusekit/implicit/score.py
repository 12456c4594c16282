"""Stage 2 driver: add a `reward` column (Float64, null where the reward function failed) to responses."""

from __future__ import annotations

from pathlib import Path
import polars as pl

from fusekit.implicit.config import RewardOptions
from fusekit.implicit.prompts import Prompt
from fusekit.implicit.reward import RewardModel, ScoreReport, load_function, score_with_function


class Scorer:
    """The configured reward: a function (verifier) or a reward model, loaded once."""

    def __init__(self, opts: RewardOptions, search: Path | None = None, device: str | None = None):
        self.opts = opts
        self.fn = load_function(opts.function, search) if opts.function is not None else None
        self._device = device
        self._model: RewardModel | None = None

    def score(self, responses: pl.DataFrame, prompts: dict[str, Prompt]) -> tuple[pl.DataFrame, ScoreReport]:
        """`responses` with a `reward` column, and what failed (named, counted)."""
        report = ScoreReport()
        rows = [
            (f"prompt {r['prompt_id']} / {r['source']} sample {r['sample']}", prompts[r["prompt_id"]].messages, r["response"], prompts[r["prompt_id"]].reference)
            for r in responses.select("prompt_id", "source", "sample", "response").iter_rows(named=True)
        ]
        if self.fn is not None:
            name = self.opts.function
            rewards = score_with_function(self.fn, rows, report, name=f"reward function {name!r}")
        else:
            if self._model is None:
                self._model = RewardModel(self.opts.model, self._device)
            values = self._model.score([(m, r) for _, m, r, _ in rows], self.opts.batch_size)
            # NaN/inf from the model is counted like a failing function.
            it = iter(values)
            rewards = score_with_function(lambda *_: next(it), rows, report, name="reward model")
        return responses.with_columns(pl.Series("reward", rewards, dtype=pl.Float64)), report
