"""`fusekit fusechat`: FuseChat from one config — pairwise fusion into a pivot, then a parameter merge.

For each source S_j: fuse (pivot, S_j) into T_j, a copy of the pivot trained on λ·CLM + (1−λ)·fusion
with the pair's distributions (extract both over the chat corpus, align S_j onto the pivot's tokens,
train). Then merge the T_j in parameter space relative to the pivot (VaRM by default). Every step
writes a resumable store or a finished model under the workdir, so re-running continues.

Config (YAML; unknown keys are rejected):

    workdir: runs/fusechat
    pivot:   {name: pivot, model: path/or/hub-id}
    sources: [{name: s1, model: …}, {name: s2, model: …}]
    corpus:  {name: chat, data: chat.jsonl}        # `messages` records: loss on assistant tokens only
    eval:    [{name: heldout, data: heldout.jsonl}]
    extract: {top_k: 10, max_length: 2048}
    train:   {lr: 1e-5, epochs: 1, …}              # as in a recipe's train block
    pair:    {fusion: min_ce, granularity: window, lam: 0.9}
    merge:   {method: varm}                        # or sce (FuseChat-2.0), linear, task_arithmetic, ties, dare_ties, dare_linear, slerp
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from fusekit.recipe import JobSpec, Recipe, TrainOptions, TrainVariant
from fusekit.specs import ModelSpec, RecipeError, Strict, read_config

MergeMethod = Literal["varm", "sce", "linear", "task_arithmetic", "ties", "dare_ties", "dare_linear", "slerp"]


class PairOptions(Strict):
    fusion: Literal["min_ce", "avg_ce"] = "min_ce"
    granularity: Literal["window", "token"] = "window"
    lam: float = Field(0.9, ge=0.0, le=1.0)


class MergeOptions(Strict):
    method: MergeMethod = "varm"
    weights: list[float] | None = None
    density: float | None = Field(None, gt=0, le=1)
    seed: int = 0


class FuseChatRecipe(JobSpec):
    pivot: ModelSpec
    train: TrainOptions = TrainOptions(variants=[TrainVariant(name="pair")], preset="fusechat")
    pair: PairOptions = PairOptions()
    merge: MergeOptions = MergeOptions()

    @model_validator(mode="after")
    def _check(self) -> "FuseChatRecipe":
        self.check_distinct_names("pivot", self.pivot)
        if self.merge.method == "slerp" and len(self.sources) != 1:
            raise ValueError("slerp merges exactly two models: the pivot's fusion with one source")
        return self

    def as_recipe(self) -> Recipe:
        """The equivalent FuseLLM recipe (pivot = target), which the pipeline's stages run."""
        variant = TrainVariant(name="pair", **self.pair.model_dump())
        return Recipe(
            workdir=self.workdir,
            target=self.pivot,
            sources=self.sources,
            corpus=self.corpus,
            eval=self.eval,
            extract=self.extract,
            align=self.align,
            train=self.train.model_copy(update={"variants": [variant], "preset": self.train.preset or "fusechat"}),
        )


def load_fusechat(path: str | Path) -> FuseChatRecipe:
    """Read, validate and resolve a FuseChat config; every problem is reported in one RecipeError."""
    path = Path(path)
    config = read_config(path, FuseChatRecipe, "FuseChat config")
    resolved = config.as_recipe().resolve(path.parent)
    return config.model_copy(
        update={
            "workdir": resolved.workdir,
            "pivot": resolved.target,
            "sources": resolved.sources,
            "corpus": resolved.corpus,
            "eval": resolved.eval,
        }
    )


def run_fusechat(config: FuseChatRecipe, progress: bool = True) -> dict:
    """Extract → (align + train) per pair → merge → evaluate; returns what it wrote to results.json."""
    from fusekit.merge import merge_models
    from fusekit.pipeline import Layout, _stage, align_to, check_tasks, evaluate_all, extract_all, train_variant

    recipe = config.as_recipe()
    check_tasks(recipe)  # before any stage spends compute
    layout = Layout(Path(recipe.workdir))
    layout.root.mkdir(parents=True, exist_ok=True)
    extract_all(recipe, layout, progress)
    variant = recipe.train.variants[0]
    fused: dict[str, Path] = {}
    reports: dict[str, dict] = {}
    for source in recipe.sources:
        pair_dir = layout.root / "pairs" / source.name
        reports[source.name] = align_to(recipe, layout, [source.name], pair_dir / "aligned", progress)
        fused[source.name] = train_variant(recipe, variant, pair_dir / "aligned", pair_dir / "model", progress)

    _stage(f"merge · {config.merge.method}")
    merged_dir = layout.root / "merged"
    if not (merged_dir / "fusekit_merge.json").is_file():
        merge_models(
            recipe.target.model,
            list(fused.values()),
            merged_dir,
            config.merge.method,
            weights=config.merge.weights,
            density=config.merge.density,
            seed=config.merge.seed,
            overwrite=True,
            progress=progress,
        )

    models = {f"{recipe.target.name} (pivot)": recipe.target.model}
    models.update({s.name: s.model for s in recipe.sources})
    models.update({f"{recipe.target.name}+{name}": str(path) for name, path in fused.items()})
    models[f"merged ({config.merge.method})"] = str(merged_dir)
    evaluation = evaluate_all(recipe, models, progress, layout) if recipe.eval else None
    result = {
        "eval": evaluation.ce if evaluation else [], "tasks": evaluation.tasks if evaluation else [],
        "align_report": reports, "merged": str(merged_dir), "pairs": {k: str(v) for k, v in fused.items()},
    }
    layout.results.write_text(json.dumps(result, indent=2) + "\n")
    return result
