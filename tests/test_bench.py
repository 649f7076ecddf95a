"""The benchmark runs end to end on the tiny model and writes its report (the GPU figures in
docs/performance.md come from the same script at full size)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_the_benchmark_measures_side_by_side_and_keeps_the_notes(tmp_path: Path) -> None:
    doc = tmp_path / "performance.md"
    marker = "<!-- notes: kept when the tables above are written again -->"
    doc.write_text(f"old tables\n{marker}\nhand-written notes\n")
    command = [sys.executable, str(ROOT / "bench" / "performance.py"), "--scale", "tiny", "--device", "cpu"]
    command += ["--size", "256x256", "--steps", "2", "--repeat", "1", "--work", str(tmp_path / "work")]
    command += ["--requests", "4", "--clients", "2"]
    subprocess.run([*command, "--stages", "pipeline,text,http"], check=True, cwd=ROOT, timeout=600)
    subprocess.run([*command, "--stages", "report", "--doc", str(doc)], check=True, cwd=ROOT, timeout=120)

    results = json.loads((tmp_path / "work" / "results.json").read_text())
    assert set(results["commands"]) == {"pipeline", "text", "http"}
    for path in ("diffusers", "server-bf16"):
        row = results["pipeline"][path]
        assert row["batch4"]["images_per_s"] > 0
        assert row["batch1"]["forward_s"] > 0
    # The server encodes a short prompt in a window of its own, the baseline in 512 tokens.
    assert results["text"]["diffusers"]["window"] == 512
    assert results["text"]["server-bf16"]["window"] < 512
    assert results["http"]["server-bf16"]["images"] == 4
    assert 1 <= results["http"]["server-bf16"]["mean_batch"] <= 2

    text = doc.read_text()
    assert "old tables" not in text
    assert text.rstrip().endswith("hand-written notes")
    assert "| diffusers | " in text
    assert "1.00x" in text  # the baseline's own ratio, the others' against it
    assert "## Through HTTP on loopback" in text
