"""The vLLM sampling backend (`sample: {backend: vllm}`, or `auto` where vLLM and a CUDA GPU exist).

vLLM (Kwon et al., 2023, arXiv 2309.06180: paged attention, continuous batching) generates many
samples per prompt much faster than `transformers.generate` on a GPU. It is an optional dependency,
imported only here and only when chosen.

Same prompts and same rows as the `transformers` backend: the prompt is rendered with the model's own
tokenizer and chat template (`render_prompt`) and handed to vLLM as token ids (so vLLM adds no second
BOS), generation stops at the same EOS ids (the tokenizer's and the generation config's), the EOS is
not part of the tokens, the text is the model tokenizer's decoding of the tokens, and vLLM's finish
reasons map to "stop" / "length". The random numbers differ from the `transformers` backend's (a
sampled answer is another draw, not the same one), so the backend that ran is part of the sample
stage's identity. Each prompt's request carries its own seed, derived from the chunk's: a re-run or
resumed chunk draws the same answers on the same vLLM version and GPU.

`generations_from_vllm` (vLLM's output objects → fusekit's Generation rows) is tested with stand-ins
shaped like vLLM's `RequestOutput` / `CompletionOutput`; the calls into vLLM itself run only on a
machine with vLLM and a GPU (benchmarks/bench_implicit.py --vllm).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

from fusekit.implicit.errors import ImplicitError
from fusekit.implicit.generation import Generation, eos_ids
from fusekit.implicit.stage import derive_seed

BACKENDS = ("auto", "transformers", "vllm")
INSTALL_HINT = "pip install vllm on a machine with a CUDA GPU, or set sample.backend to transformers (or auto)"


def vllm_problem() -> str | None:
    """Why vLLM cannot sample here (None: it can)."""
    try:
        import vllm  # noqa: F401  (only whether it imports)
    except ImportError as exc:
        return f"vLLM is not installed ({exc})"
    import torch

    if not torch.cuda.is_available():
        return "vLLM is installed but no CUDA GPU is available"
    return None


def resolve_backend(choice: str) -> str:
    """`auto` → vllm where vLLM imports and CUDA is available, else transformers; `vllm` where it cannot
    run → ImplicitError naming the fix."""
    if choice not in BACKENDS:
        raise ImplicitError(f"sample.backend {choice!r}: choose one of {', '.join(BACKENDS)}")
    if choice == "transformers":
        return choice
    problem = vllm_problem()
    if choice == "auto":
        return "transformers" if problem else "vllm"
    if problem:
        raise ImplicitError(f"sample.backend vllm: {problem}; {INSTALL_HINT}")
    return "vllm"


_FINISH = {"stop": "stop", "length": "length"}


def generations_from_vllm(outputs: Sequence, n: int, stop_ids: Iterable[int], decode: Callable[[list[int]], str]) -> list[list[Generation]]:
    """vLLM's `LLM.generate` result (one RequestOutput per prompt, in prompt order) → [prompts][n] Generations.

    Each RequestOutput's `.outputs` holds CompletionOutputs with `.token_ids` and `.finish_reason`
    ("stop" at an EOS or stop token, "length" at max_tokens). A request that returned one completion
    (greedy decoding) is repeated n times, as the transformers backend does. A trailing stop id is
    dropped (vLLM versions differ on whether token_ids keep it); text = decode(token ids).
    Raises ImplicitError for another finish reason (an aborted request) or a missing completion.
    """
    stops = set(stop_ids)
    result: list[list[Generation]] = []
    for request in outputs:
        completions = sorted(request.outputs, key=lambda c: c.index)
        if len(completions) == 1 and n > 1:
            completions = completions * n
        if len(completions) != n:
            raise ImplicitError(f"vLLM returned {len(completions)} completions for a prompt, expected {n}")
        row = []
        for c in completions:
            reason = _FINISH.get(c.finish_reason)
            if reason is None:
                raise ImplicitError(f"vLLM ended a completion with finish reason {c.finish_reason!r} (expected stop or length)")
            ids = [int(t) for t in c.token_ids]
            if reason == "stop" and ids and ids[-1] in stops:
                ids = ids[:-1]
            row.append(Generation(decode(ids), ids, reason))
        result.append(row)
    return result


@dataclass
class VLLMGenerator:
    """A vLLM engine for one model, with that model's tokenizer (for the chat template and decoding)."""

    llm: object
    tokenizer: object
    stop_ids: list[int]

    def generate(self, texts: Sequence[str], *, n: int, max_new_tokens: int, temperature: float, top_p: float, seed: int) -> list[list[Generation]]:
        """n generations for each text; returns [len(texts)][n] (as `sample.generate`)."""
        from vllm import SamplingParams

        greedy = temperature <= 0
        prompts = [{"prompt_token_ids": self.tokenizer(t, add_special_tokens=False)["input_ids"]} for t in texts]
        params = [
            SamplingParams(
                n=1 if greedy else n, temperature=0.0 if greedy else temperature, top_p=1.0 if greedy else top_p,
                max_tokens=max_new_tokens, seed=derive_seed(seed, i), stop_token_ids=self.stop_ids,
                skip_special_tokens=True,
            )
            for i in range(len(texts))
        ]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return generations_from_vllm(outputs, n, self.stop_ids, lambda ids: self.tokenizer.decode(ids, skip_special_tokens=True))

    def close(self) -> None:
        """Free the GPU memory vLLM holds, so that training can use it (best effort: vLLM keeps some state)."""
        import gc

        import torch

        self.llm = None
        try:
            from vllm.distributed.parallel_state import destroy_distributed_environment, destroy_model_parallel

            destroy_model_parallel()
            destroy_distributed_environment()
        except Exception:  # older or newer vLLM without these: garbage collection still frees the weights
            pass
        gc.collect()
        torch.cuda.empty_cache()


def load_vllm(model: str | Path, seed: int) -> VLLMGenerator:
    """vLLM's engine for MODEL (a folder or hub id) and the model's own tokenizer; ImplicitError when
    vLLM cannot run here."""
    problem = vllm_problem()
    if problem:
        raise ImplicitError(f"sample.backend vllm: {problem}; {INSTALL_HINT}")
    from vllm import LLM

    from fusekit.models.load import load_tokenizer

    tok = load_tokenizer(model)
    try:
        from transformers import GenerationConfig

        config = GenerationConfig.from_pretrained(str(model))
    except Exception:  # no generation_config.json: the tokenizer's EOS alone
        config = None
    return VLLMGenerator(LLM(model=str(model), seed=seed), tok, sorted(eos_ids(tok, config)))
