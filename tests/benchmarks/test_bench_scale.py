"""`benchmarks/bench_scale.py --quick` runs every part end to end (extract → align, one shard job's memory,
the plan against the exact count) and writes its tables."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def test_scale_rehearsal_quick_runs(tmp_path):
    md = tmp_path / "scale.md"
    env = {**os.environ, "TMPDIR": str(tmp_path), "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "bench_scale.py"), "--quick", "--markdown", str(md)],
                          capture_output=True, text=True, env=env, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    text = md.read_text()
    for title in ("Rehearsal: extract → align", "MiniPile", "One extraction shard job", "`fusekit plan`"):
        assert title in text, text
    assert "| align | 128 | 64 |" in text and "| extract (4 models) | 2 |" in text
    assert not list(tmp_path.glob("fusekit-scale-corpus*"))  # the generated corpus is removed
