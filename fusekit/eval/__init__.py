"""Evaluation: mean cross-entropy and perplexity per dataset (`fusekit eval`, `fusekit.run_eval`)."""

from fusekit.corpus import CorpusError
from fusekit.eval.perplexity import evaluate, evaluate_loaded

__all__ = ["CorpusError", "evaluate", "evaluate_loaded"]
