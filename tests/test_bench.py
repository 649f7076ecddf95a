"""The benchmark runs end to end on the tiny model and writes its report (the GPU figures in
docs/performance.md come from the same script at full size)."""

from __future__ import annotations

import importlib.util
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
    subprocess.run([*command, "--stages", "pipeline,text,http,imports"], check=True, cwd=ROOT, timeout=600)
    subprocess.run([*command, "--stages", "report", "--doc", str(doc)], check=True, cwd=ROOT, timeout=120)

    results = json.loads((tmp_path / "work" / "results.json").read_text())
    assert set(results["commands"]) == {"pipeline", "text", "http", "imports"}
    for path in ("diffusers", "server-bf16"):
        row = results["pipeline"][path]
        assert row["batch4"]["images_per_s"] > 0
        assert row["batch1"]["forward_s"] > 0
    # The server encodes a short prompt in a window of its own, the baseline in 512 tokens.
    assert results["text"]["diffusers"]["window"] == 512
    assert results["text"]["server-bf16"]["window"] < 512
    assert results["http"]["server-bf16"]["images"] == 4
    assert 1 <= results["http"]["server-bf16"]["mean_batch"] <= 2
    # The server's imports, twice in fresh interpreters: torch's share among the packages named.
    runs = results["imports"]["runs"]
    assert len(runs) == 2
    for run in runs:
        assert run["by_package_s"]["torch"] > 0
        assert 0 < run["import_s"] < run["wall_s"]

    text = doc.read_text()
    assert "old tables" not in text
    assert text.rstrip().endswith("hand-written notes")
    assert "| diffusers | " in text
    assert "1.00x" in text  # the baseline's own ratio, the others' against it
    assert "## Through HTTP on loopback" in text
    assert "## The server's imports" in text
    assert "| 2 | " in text.split("## The server's imports")[1]


@pytest.mark.slow
def test_the_cold_start_sees_the_first_image_before_the_compiled_pipeline(tmp_path: Path) -> None:
    """A new replica with compile on (the tiny model on the CPU): the client's first image comes
    once the server is ready and before the compiled pipeline takes over; the report shows it."""
    command = [sys.executable, str(ROOT / "bench" / "performance.py"), "--scale", "tiny", "--device", "cpu"]
    command += ["--size", "256x256", "--steps", "2", "--work", str(tmp_path / "work")]
    # One image a batch: the warm-up's two calls instead of six (no batch shapes to compile).
    command += ["--paths", "server-bf16", "--coldstart-runs", "new"]
    command += ["--server-args=--compile true --max-batch-size 1"]
    subprocess.run([*command, "--stages", "coldstart"], check=True, cwd=ROOT, timeout=900)
    doc = tmp_path / "performance.md"
    subprocess.run([*command, "--stages", "report", "--doc", str(doc)], check=True, cwd=ROOT, timeout=120)

    row = json.loads((tmp_path / "work" / "results.json").read_text())["coldstart"]["server-bf16"]
    seen = row["empty_cache_seen"]
    assert seen["ready_s"] <= seen["first_image_s"] < seen["compiled_s"] <= seen["full_speed_s"], seen
    assert row["empty_cache_s"] == seen["ready_s"]
    assert row["empty_cache_phases"]["until_compiled"] > row["empty_cache_phases"]["until_ready"]
    assert "| server-bf16 | new replica | " in doc.read_text().split("first image served s")[1]


def test_server_flags_reach_the_server_paths_measured_in_process(tmp_path: Path) -> None:
    """``--server-args`` sets the server paths of the pipeline stage as it sets the servers the
    other stages start; the plain diffusers baseline stays as diffusers has it."""
    spec = importlib.util.spec_from_file_location("bench_performance", ROOT / "bench" / "performance.py")
    assert spec is not None
    assert spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    flags = "--compile-batch-unbacked --compile-parts transformer,vae"
    server = bench.server_settings(tmp_path, "server-bf16", "256x256", "cpu", server_args=flags)
    assert server.compile_batch_unbacked is True
    assert server.compile_parts == ["transformer", "vae"]
    assert server.warmup_sizes == ["256x256"]  # the benchmark's own settings are kept
    plain = bench.server_settings(tmp_path, "server-bf16", "256x256", "cpu")
    assert plain.compile_batch_unbacked is False
    baseline = bench.server_settings(tmp_path, "diffusers", "256x256", "cpu", server_args=flags)
    assert baseline.compile_batch_unbacked is False


@pytest.mark.slow
def test_the_soak_runs_its_mixed_traffic_and_reports(tmp_path: Path) -> None:
    """A short soak (the documented one runs for 10 minutes): every kind of traffic reaches the
    server, the report holds memory, statuses and probe latency, and nothing answered 5xx."""
    command = [sys.executable, str(ROOT / "bench" / "soak.py"), "--minutes", "0.4", "--sample-s", "8"]
    out = subprocess.run(
        [*command, "--out", str(tmp_path)], cwd=ROOT, timeout=600, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stdout + out.stderr
    report = json.loads((tmp_path / "soak.json").read_text())
    assert len(report["samples"]) >= 3
    assert all(sample["rss_mib"] > 0 for sample in report["samples"])
    statuses = report["statuses"]
    assert statuses.get("200", 0) > 0
    assert statuses.get("400", 0) > 0
    assert statuses.get("413", 0) > 0
    log = (tmp_path / "server.log").read_text(errors="replace")
    assert report["server_errors"] == 0, report["markdown"] + "\n" + log[-4000:]
    counts = report["samples"][-1]["counts"]
    assert counts["slowloris"].get("closed by server", 0) > 0, "half-sent requests were closed"
    assert counts["probe"].get("200", 0) > 0
    assert report["well_behaved_errors"] == 0, counts
    # The hostile clients ran beside them, and the server closed what they held.
    assert counts["api-hold"].get("closed by server", 0) > 0, "idle connections past the cap made room"
    assert counts["health-hold"].get("closed by server", 0) > 0
    assert counts["bodiless"].get("200", 0) > 0
    assert counts["nonreader"].get("closed by server", 0) > 0, "unread answers were cut"
    assert "| time | RSS (MiB) |" in out.stdout


@pytest.mark.slow
def test_the_partial_image_benchmark_runs_each_count_side_by_side(tmp_path: Path) -> None:
    out = tmp_path / "partials.json"
    command = [sys.executable, str(ROOT / "bench" / "partials.py"), "--scale", "tiny", "--device", "cpu"]
    command += ["--size", "256x256", "--repeat", "1", "--work", str(tmp_path / "work"), "--out", str(out)]
    subprocess.run(command, check=True, cwd=ROOT, timeout=600)
    rows = json.loads(out.read_text())["rows"]
    assert [rows[count]["partials"] for count in ("0", "1", "3")] == [0, 1, 3]
    assert rows["0"]["decode_ms"] is None
    assert rows["3"]["decode_ms"] > 0
    assert "ms_per_partial" in rows["3"]


@pytest.mark.slow
def test_the_multi_gpu_benchmark_runs_each_case_beside_one_worker(tmp_path: Path) -> None:
    """On the CPU the "GPUs" are CPU workers and gloo ranks: a check of the script, whose GPU
    figures are taken on a machine with several GPUs."""
    out = tmp_path / "multigpu.json"
    command = [sys.executable, str(ROOT / "bench" / "multigpu.py"), "--scale", "tiny", "--device", "cpu"]
    command += ["--gpus", "2", "--modes", "data,sequence", "--size", "256x256", "--steps", "2"]
    command += ["--repeat", "1", "--requests", "4", "--work", str(tmp_path / "work"), "--results", str(out)]
    subprocess.run(command, check=True, cwd=ROOT, timeout=900)
    results = json.loads(out.read_text())
    assert results["data"]["1"]["images_per_s"] > 0
    assert results["data"]["2"]["scaling"] > 0
    sequence = results["sequence"]["2"]
    assert sequence["s_per_image"] > 0
    assert sequence["step_ms"] > 0
    assert sequence["max_pixel_diff"] <= 2, "two ranks make the one-process image"


@pytest.mark.slow
def test_the_weight_prefetch_benchmark_starts_the_server_each_way(tmp_path: Path) -> None:
    out = tmp_path / "prefetch.json"
    command = [sys.executable, str(ROOT / "bench" / "weights_prefetch.py"), "--gib", "0.05", "--runs", "1"]
    command += ["--work", str(tmp_path / "work"), "--results", str(out)]
    subprocess.run(command, check=True, cwd=ROOT, timeout=600)
    results = json.loads(out.read_text())
    assert 0.04 < results["weights_gib"] < 0.06
    modes = {run["mode"]: run for run in results["runs"]}
    assert set(modes) == {"on", "off", "warm"}
    # Only the server that reads ahead reports the reading; every start loads the weights.
    assert modes["on"]["weights_prefetch_s"] > 0
    assert "weights_prefetch_s" not in modes["off"]
    assert all(run["load_s"] > 0 and run["ready_s"] > run["start_s"] for run in modes.values())


def test_a_measurement_a_run_did_not_make_reads_not_run_never_nan() -> None:
    spec = importlib.util.spec_from_file_location(
        "performance_report", ROOT / "bench" / "performance_report.py"
    )
    assert spec is not None
    assert spec.loader is not None
    report = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(report)
    # HTTP measured for a path whose pipeline stage did not run; a cold start without artifacts.
    results = {
        "http": {"server-fp8": {"clients": 4, "images_per_s": 3.0, "encode_ms_per_image": 5.0}},
        "coldstart": {"server-bf16": {"empty_cache_s": 90.0}},
    }
    text = report.render(results, ("diffusers", "server-bf16", "server-fp8"), "a fox")
    assert "nan" not in text
    assert "| server-fp8 | 4 | 3.00 | not run | not run | not run | not run | 5.0 | not run |" in text
    assert "| server-bf16 | 90.0 | not run | not run |" in text
