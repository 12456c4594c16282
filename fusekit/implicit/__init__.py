"""Implicit model fusion (FuseChat-3.0, arXiv 2503.04222): sample every source, score the responses,
SFT the target on the best ones, then DPO on best-vs-worst pairs from the same source (or WRPO).

`fusekit.run_implicit("config.yaml")` or `fusekit implicit config.yaml`; see docs/IMPLICIT.md.
"""

from fusekit.implicit.build import build_sets, build_wrpo
from fusekit.implicit.config import ImplicitConfig, load_implicit
from fusekit.implicit.dpo import dpo_loss, wrpo_loss
from fusekit.implicit.errors import ImplicitError
from fusekit.implicit.prompts import Prompt, read_prompts
from fusekit.implicit.reward import exact_match, numeric
from fusekit.implicit.run import implicit_fusion

__all__ = [
    "ImplicitConfig",
    "ImplicitError",
    "Prompt",
    "build_sets",
    "build_wrpo",
    "dpo_loss",
    "exact_match",
    "implicit_fusion",
    "load_implicit",
    "numeric",
    "read_prompts",
    "wrpo_loss",
]
