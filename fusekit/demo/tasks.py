"""The demo's downstream tasks, built from the held-out documents of each domain and run by lm-eval.

Papers report fused models on benchmarks (FuseLLM: Big-Bench Hard, commonsense, MultiPL-E); the demo
does the same in miniature, offline, with local lm-eval tasks (a YAML whose dataset is a JSONL file):

- `demo_next_line_<domain>` — multiple choice, accuracy per byte (`acc_norm`; chance 0.25): a few consecutive lines of a
  held-out text; which of four lines comes next? The true next line, a line of another held-out text
  of the same domain and one line of each other domain, all of similar length (a length prior alone
  does not answer it). A model that knows the domain rules out the other domains' lines; telling the
  true line from the same-domain one takes the context.
- `demo_complete_code` — generation, exact match: a held-out line of code cut two characters into its
  last name (`return self._va` → `lue`); greedy until the name ends (a space, bracket, dot, comma,
  colon, `=` or the end of the line).

No model has seen these texts (held-out documents), and the items are a pure function of the texts and
the seed, so every model answers the same questions.
"""

from __future__ import annotations

import json
import random
import re
from pathlib import Path

NEXT_LINE = "demo_next_line_{domain}"
COMPLETE = "demo_complete_code"
CONTEXT_LINES = 3
_LINE_CHARS = (16, 100)  # a candidate line's length without its indentation
_TAIL = re.compile(r"^(?P<prefix>.*[^\w])(?P<name>[A-Za-z_]\w{4,})(?P<end>[^\w\s]{0,3})$")
GIVEN = 2  # characters of the name in the prompt
STOPS = ["\n", " ", "(", ")", "[", "]", ".", ",", ":", "="]

_MC_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "{{{{context}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
target_delimiter: ""
metric_list:
  - {{metric: acc, aggregation: mean, higher_is_better: true}}
  - {{metric: acc_norm, aggregation: mean, higher_is_better: true}}
metadata: {{version: 1.0}}
"""

_GEN_YAML = """task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
target_delimiter: ""
generation_kwargs: {{until: {stops}, max_gen_toks: 8, do_sample: false}}
metric_list:
  - {{metric: exact_match, aggregation: mean, higher_is_better: true, regexes_to_ignore: ["^\\\\s+", "\\\\s+$"]}}
metadata: {{version: 1.0}}
"""


def _texts(path: Path) -> list[str]:
    return [json.loads(ln)["text"] for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip()]


def _usable(line: str) -> bool:
    return _LINE_CHARS[0] <= len(line.strip()) <= _LINE_CHARS[1]


def _similar(pool: list[str], answer: str, rng: random.Random) -> str | None:
    """A line of `pool` within ±30 % of the answer's length (not the answer itself), or None."""
    size = len(answer.strip())
    fits = [ln for ln in pool if ln.strip() != answer.strip() and 0.7 * size <= len(ln.strip()) <= 1.3 * size]
    return rng.choice(fits) if fits else None


def next_line_items(texts: dict[str, list[str]], domain: str, n: int, seed: int) -> list[dict]:
    """Up to `n` multiple-choice items of `domain`: {context, choices (4 lines), label (the true next line)}.

    `texts`: every domain's held-out texts (the other domains give two of the three wrong lines).
    """
    rng = random.Random(f"next-line/{domain}/{seed}")
    lines = [[ln.rstrip() for ln in t.splitlines()] for t in texts[domain]]
    pools = {
        other: [ln.rstrip() for t in docs for ln in t.splitlines() if _usable(ln)]
        for other, docs in texts.items() if other != domain
    }
    spots = [
        (d, i)
        for d, ls in enumerate(lines)
        for i in range(CONTEXT_LINES, len(ls))
        if _usable(ls[i]) and sum(len(x.strip()) for x in ls[i - CONTEXT_LINES : i]) >= 20
    ]
    rng.shuffle(spots)
    items = []
    for d, i in spots:
        answer = lines[d][i]
        same = [ln for doc, ls in enumerate(lines) if doc != d for ln in ls if _usable(ln)]
        distractors = [_similar(same, answer, rng), *(_similar(pool, answer, rng) for pool in pools.values())]
        if None in distractors or len({x.strip() for x in distractors}) < len(distractors):
            continue
        # Every choice starts where the true line starts: the context ends with its indentation and the
        # choices are stripped, so indentation (free tokens for code) favours no line.
        choices = [x.strip() for x in (answer, *distractors)]
        rng.shuffle(choices)
        indent = answer[: len(answer) - len(answer.lstrip())]
        context = "\n".join(lines[d][i - CONTEXT_LINES : i]) + "\n" + indent
        items.append({"context": context, "choices": choices, "label": choices.index(answer.strip())})
        if len(items) == n:
            break
    return items


def completion_items(texts: list[str], n: int, seed: int) -> list[dict]:
    """Up to `n` generation items: {prompt: preceding lines + the line up to GIVEN characters into its last
    name, answer: the rest of the name}."""
    rng = random.Random(f"complete/{seed}")
    spots = []
    for t in texts:
        ls = [ln.rstrip() for ln in t.splitlines()]
        for i in range(2, len(ls)):
            stripped = ls[i].strip()
            found = _TAIL.match(ls[i])
            # Code, not a docstring's prose: the line so far has an operator, a call, an index or an attribute.
            if found and _usable(ls[i]) and not stripped.startswith("#") and any(c in found.group("prefix") for c in "=([."):
                name = found.group("name")
                prompt = "\n".join(ls[max(0, i - CONTEXT_LINES) : i]) + "\n" + found.group("prefix") + name[:GIVEN]
                spots.append({"prompt": prompt, "answer": name[GIVEN:]})
    rng.shuffle(spots)
    return spots[:n]


def _write(items: list[dict], path: Path) -> Path:
    path.write_text("".join(json.dumps(it, ensure_ascii=False) + "\n" for it in items), encoding="utf-8")
    return path


def write_demo_tasks(heldout: dict[str, Path], folder: Path, items: int, completions: int, seed: int = 0) -> list[str]:
    """Write the task YAMLs and their JSONL data into FOLDER (an lm-eval include path); returns the task names.

    Raises ValueError when a domain's held-out text yields no item (its budget is too small).
    """
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    texts = {domain: _texts(path) for domain, path in heldout.items()}
    for domain, path in heldout.items():
        found = next_line_items(texts, domain, items, seed)
        if not found:
            raise ValueError(f"no next-line item in {path}: raise the demo's held-out budget")
        task = NEXT_LINE.format(domain=domain)
        data = _write(found, folder / f"{task}.jsonl")
        (folder / f"{task}.yaml").write_text(_MC_YAML.format(task=task, data=json.dumps(str(data.resolve()))), encoding="utf-8")
        names.append(task)
    if "code" in heldout and completions:
        found = completion_items(texts["code"], completions, seed)
        data = _write(found, folder / f"{COMPLETE}.jsonl")
        yaml_text = _GEN_YAML.format(task=COMPLETE, data=json.dumps(str(data.resolve())), stops=json.dumps(STOPS))
        (folder / f"{COMPLETE}.yaml").write_text(yaml_text, encoding="utf-8")
        names.append(COMPLETE)
    return names
