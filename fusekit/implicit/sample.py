"""Stage 1 (sample): every model answers every prompt n times with its own chat template.

Two backends (`sample.backend`): batched `transformers` generation with left padding (here), or vLLM
(`vllm_backend.py`); `auto` takes vLLM where it is installed and a CUDA GPU is available. Both write
the same rows (RESPONSE_SCHEMA). Chunk c of model M (prompts [c·B, (c+1)·B), each answered n times)
draws from an RNG seeded with derive_seed(seed, M, c), so the output is a pure function of (model,
prompts, options, backend): re-running gives the same file, and a killed run resumes at the first
chunk without a part file and still produces exactly the uninterrupted result.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import polars as pl

from fusekit.implicit.config import SampleOptions
from fusekit.implicit.errors import ImplicitError
from fusekit.implicit.generation import Generation, eos_ids
from fusekit.implicit.prompts import Prompt, render_prompt
from fusekit.implicit.sequences import pad_id
from fusekit.implicit.stage import derive_seed, write_parquet
from fusekit.implicit.vllm_backend import load_vllm, resolve_backend

RESPONSE_SCHEMA = {
    "prompt_id": pl.String,
    "source": pl.String,
    "sample": pl.Int32,
    "response": pl.String,
    "tokens": pl.List(pl.Int32),
    "n_tokens": pl.Int32,
    "finish_reason": pl.String,
}


@dataclass
class LoadedModel:
    """The `transformers` backend: a causal LM and its tokenizer (left padding)."""

    net: object
    tokenizer: object
    device: object

    def generate(self, texts: Sequence[str], **options) -> list[list[Generation]]:
        return generate(self, texts, **options)

    def close(self) -> None:
        """Nothing to do: the model is freed with the object."""


def load_generator(model: str | Path, device: str | None = None) -> LoadedModel:
    """A causal LM (bf16 on a GPU, fp32 on CPU) in eval mode and its tokenizer, set to pad on the left."""
    from fusekit.models.device import load_net, resolve_device, resolve_dtype
    from fusekit.models.load import load_tokenizer

    dev = resolve_device(device)
    net = load_net(model, resolve_dtype(None, dev), dev, False)
    tok = load_tokenizer(model)
    tok.padding_side = "left"
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ImplicitError(f"{model}: its tokenizer has neither a pad nor an EOS token; batched generation needs one")
        tok.pad_token = tok.eos_token  # left padding is masked out: any id will do
    return LoadedModel(net, tok, dev)


def generate(
    model: LoadedModel, texts: Sequence[str], *, n: int, max_new_tokens: int, temperature: float, top_p: float, seed: int
) -> list[list[Generation]]:
    """n generations for each text (one batched `generate` call); returns [len(texts)][n].

    Texts are tokenised without added special tokens (chat templates carry their own BOS). Generation
    stops at any EOS id (`eos_ids`); the EOS is not part of the text or tokens.
    """
    import torch

    tok, net = model.tokenizer, model.net
    pad = pad_id(tok)
    enc = tok(list(texts), return_tensors="pt", padding=True, add_special_tokens=False)
    input_ids = enc["input_ids"].to(model.device)
    attention = enc["attention_mask"].to(model.device)
    stop_ids = eos_ids(tok, getattr(net, "generation_config", None))
    torch.manual_seed(seed)
    greedy = temperature <= 0
    # Greedy answers are all alike: generate once per text and repeat it n times.
    kwargs = dict(do_sample=False) if greedy else dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=0)
    per_text = 1 if greedy else n
    with torch.inference_mode():
        out = net.generate(
            input_ids=input_ids,
            attention_mask=attention,
            max_new_tokens=max_new_tokens,
            num_return_sequences=per_text,
            pad_token_id=pad,
            eos_token_id=sorted(stop_ids) or None,
            **kwargs,
        )
    new = out[:, input_ids.shape[1] :].tolist()
    result: list[list[Generation]] = []
    for i in range(len(texts)):
        row = []
        for j in range(n):
            ids = list(new[i * per_text + (0 if greedy else j)])
            end = next((k for k, t in enumerate(ids) if t in stop_ids), None)
            if end is not None:
                ids, reason = ids[:end], "stop"
            else:
                # A finished row of a batch is padded after its EOS; without EOS nothing was padded.
                reason = "length"
            row.append(Generation(tok.decode(ids, skip_special_tokens=True), ids, reason))
        result.append(row)
    return result


def response_rows(source: str, prompts: Sequence[Prompt], gens: Sequence[Sequence[Generation]]) -> pl.DataFrame:
    """RESPONSE_SCHEMA rows of one chunk: gens[i][j] is sample j of prompts[i] (either backend)."""
    rows = [
        {"prompt_id": p.id, "source": source, "sample": j, "response": g.text, "tokens": g.tokens,
         "n_tokens": len(g.tokens), "finish_reason": g.finish_reason}
        for p, row in zip(prompts, gens) for j, g in enumerate(row)
    ]
    return pl.DataFrame(rows, schema=RESPONSE_SCHEMA)


def open_generator(model: str | Path, opts: SampleOptions):
    """The generator `opts.backend` names (`auto` resolved): LoadedModel or vllm_backend.VLLMGenerator."""
    if resolve_backend(opts.backend) == "vllm":
        return load_vllm(model, opts.seed)
    return load_generator(model, opts.device)


def sample_model(
    model_ref: str | Path,
    name: str,
    prompts: Sequence[Prompt],
    opts: SampleOptions,
    parts_dir: Path,
    model=None,
    stream: str | None = None,
) -> tuple[pl.DataFrame, dict]:
    """All of `name`'s responses to `prompts` (RESPONSE_SCHEMA rows), resuming from `parts_dir`.

    Chunk c draws from derive_seed(opts.seed, stream or name, c): giving several models one `stream`
    makes them share random numbers (evaluation compares models on the same draws).

    Returns the frame and {"tokens": generated tokens, "seconds": generation time in this call}.
    `model` is a generator from `open_generator` / `load_generator` (kept open); without one, the
    backend `opts.backend` names is opened only when some chunk is missing, and closed at the end.
    """
    size = opts.batch_size
    chunks = [list(prompts[i : i + size]) for i in range(0, len(prompts), size)]
    parts_dir.mkdir(parents=True, exist_ok=True)
    tokens, seconds = 0, 0.0
    frames = []
    opened = None
    for c, chunk in enumerate(chunks):
        part = parts_dir / f"chunk-{c:05d}.parquet"
        if not part.is_file():
            if model is None:
                model = opened = open_generator(model_ref, opts)
            texts = [render_prompt(model.tokenizer, p.messages) for p in chunk]
            t0 = time.perf_counter()
            gens = model.generate(
                texts, n=opts.n, max_new_tokens=opts.max_new_tokens, temperature=opts.temperature,
                top_p=opts.top_p, seed=derive_seed(opts.seed, stream or name, c),
            )
            seconds += time.perf_counter() - t0
            tokens += sum(len(g.tokens) for row in gens for g in row)
            write_parquet(response_rows(name, chunk, gens), part)
        frames.append(pl.read_parquet(part))
    if opened is not None:
        opened.close()  # vLLM holds most of the GPU until closed
    return pl.concat(frames), {"tokens": tokens, "seconds": seconds}
