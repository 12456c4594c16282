"""`fusekit demo`: FuseLLM's domain-experts experiment in miniature, on offline assets only.

This package owns the demo and nothing the pipeline needs: it builds its own corpora and models, then
runs the ordinary recipe pipeline over them. From the bottom up:

    experts.py   the demo's models (domain experts and a target), made offline and pre-trained by fusekit
    config.py    the two presets (full and quick)
    corpora.py   the domains, from text every install has, split into pretrain / fusion / held-out
    assets.py    everything the recipe points at (corpora as JSONL, the trained models)
    report.py    the result: tables, results.json and a chart
    run.py       the driver (`fusekit demo`)

Nothing is imported here, so `import fusekit.demo.run` loads only what the demo uses.
"""
