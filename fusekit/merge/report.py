"""The VaRM weight report: per-tensor weights as JSON, a per-layer table (polars), and a plot by layer."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import polars as pl

_LAYER = re.compile(r"\.(?:layers|h|blocks|layer)\.(\d+)\.")


def layer_of(name: str) -> int | None:
    m = _LAYER.search(name)
    return int(m.group(1)) if m else None


@dataclass
class VarmReport:
    models: list[str]
    rows: list[dict] = field(default_factory=list)

    def add(self, name: str, info: dict) -> None:
        self.rows.append({"name": name, "layer": layer_of(name), **info})

    def frame(self) -> pl.DataFrame:
        """One row per tensor: name, layer, unchanged, and w_j / mean_sq_change_j per model."""
        data: dict[str, list] = {
            "name": [r["name"] for r in self.rows],
            "layer": [r["layer"] for r in self.rows],
            "unchanged": [r["unchanged"] for r in self.rows],
        }
        for j in range(len(self.models)):
            data[f"w_{j + 1}"] = [r["weights"][j] for r in self.rows]
        for j in range(len(self.models)):
            data[f"mean_sq_change_{j + 1}"] = [r["mean_sq_change"][j] for r in self.rows]
        schema = {"name": pl.String, "layer": pl.Int64, "unchanged": pl.Boolean}
        return pl.DataFrame(data, schema_overrides=schema)

    def by_layer(self) -> pl.DataFrame:
        """Mean weight of each model per layer; tensors outside the layers (embeddings, head, final norm) by name."""
        df = self.frame().with_columns(
            pl.when(pl.col("layer").is_null())
            .then(pl.col("name"))
            .otherwise(pl.format("layer {}", pl.col("layer")))
            .alias("group"),
            pl.col("layer").fill_null(-1).alias("_order"),
        )
        weights = [f"w_{j + 1}" for j in range(len(self.models))]
        return (
            df.group_by("group", maintain_order=True)
            .agg(
                pl.len().alias("tensors"),
                pl.col("unchanged").sum().alias("unchanged"),
                *[pl.col(w).mean() for w in weights],
                pl.col("_order").first(),
            )
            .sort("_order", maintain_order=True)
            .drop("_order")
        )

    def write_json(self, path: Path) -> None:
        doc = {
            "method": "varm",
            "formula": "W_j = mean((θ_j − θ_base)²) / Σ_i mean((θ_i − θ_base)²) per tensor; "
            "equal weights where no model changed",
            "models": self.models,
            "tensors": self.rows,
        }
        path.write_text(json.dumps(doc, indent=1) + "\n")

    def plot(self, path: Path) -> None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        df = self.frame().filter(pl.col("layer").is_not_null())
        fig, ax = plt.subplots(figsize=(6, 3.2), dpi=110)
        if df.height:
            per_layer = df.group_by("layer").agg(
                *[pl.col(f"w_{j + 1}").mean() for j in range(len(self.models))]
            ).sort("layer")
            for j, model in enumerate(self.models):
                ax.plot(per_layer["layer"], per_layer[f"w_{j + 1}"], marker="o", label=Path(model).name or model)
                ax.scatter(df["layer"], df[f"w_{j + 1}"], s=6, alpha=0.3)
        from matplotlib.ticker import MaxNLocator

        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("layer")
        ax.set_ylabel("VaRM weight")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title("VaRM weight by layer (line: layer mean; dots: tensors)", fontsize=9)
        ax.legend(fontsize=8)
        fig.tight_layout()
        fig.savefig(path)
        plt.close(fig)
