"""The report of bench/performance.py: its results as the Markdown tables of
docs/performance.md. A measurement a run did not make reads "not run", never ``nan``."""

from __future__ import annotations

from typing import Any

NOT_RUN = "not run"


def cell(value: float | None, spec: str, suffix: str = "") -> str:
    """A table cell: ``value`` formatted, or "not run" for a measurement the run did not make
    (never ``nan``)."""
    if value is None or value != value:
        return NOT_RUN
    return f"{value:{spec}}{suffix}"


def render(results: dict[str, Any], paths: tuple[str, ...], prompt: str) -> str:
    """The Markdown tables of ``results`` (performance.py's results.json), paths in the order
    of ``paths``; ``prompt`` is the one the pipeline stages used."""
    env = results.get("environment", {})
    lines = [
        "# Performance",
        "",
        "Written by `bench/performance.py` (the commands are below, one per stage); each stage runs",
        "in one process on one card, all paths of a table side by side. The model is the real",
        "Z-Image-Turbo architecture with random weights (no download).",
        "",
        f"- date: {env.get('date')}, card: {env.get('card')}, driver: {env.get('driver', '-')}",
        f"- python {env.get('python')}, torch {env.get('torch')}, diffusers {env.get('diffusers')}, "
        f"transformers {env.get('transformers', '-')}, torchao {env.get('torchao', '-')}, "
        f"torch bytecode read: {env.get('torch_bytecode', '-')}",
        f"- {results.get('size')}, {results.get('steps')} steps, prompt of {len(prompt)} characters",
        *(f"- {stage}: `{command}`" for stage, command in results.get("commands", {}).items()),
        "",
    ]
    pipeline = results.get("pipeline", {})
    base = pipeline.get("diffusers", {})
    measured = [
        (path, pipeline[path]) for path in paths if pipeline.get(path) and "error" not in pipeline[path]
    ]
    if pipeline:
        lines += [
            "## End to end in the pipeline (seconds per image; ratio = baseline / this)",
            "",
            "| path | batch 1 s/image | vs baseline | batch 4 s/image | batch 4 images/s | vs baseline "
            "| peak VRAM GiB |",
            "|---|---|---|---|---|---|---|",
        ]
        for path, row in measured:
            one, four = row["batch1"], row["batch4"]
            ratio1 = base["batch1"]["s_per_image"] / one["s_per_image"] if base else None
            ratio4 = base["batch4"]["s_per_image"] / four["s_per_image"] if base else None
            lines.append(
                f"| {path} | {one['s_per_image']:.3f} | {cell(ratio1, '.2f', 'x')} | "
                f"{four['s_per_image']:.3f} | {four['images_per_s']:.2f} | {cell(ratio4, '.2f', 'x')} | "
                f"{cell(row.get('peak_vram_gib'), '.1f')} |"
            )
        lines += [
            "",
            "## Where the time goes (milliseconds per image, batch 1 / batch 4)",
            "",
            "| path | text encoding | one transformer forward | VAE decode | attention backend |",
            "|---|---|---|---|---|",
        ]
        for path, row in measured:
            one, four = row["batch1"], row["batch4"]

            def pair(key: str, one: dict[str, float] = one, four: dict[str, float] = four) -> str:
                return f"{1000 * one[key]:.1f} / {1000 * four[key]:.1f}"

            text = pair("text_s")
            alone = results.get("text", {}).get("diffusers" if path == "diffusers" else "server-bf16")
            if alone:  # the text stage's figures, measured on their own
                text = f"{1000 * alone['batch1_s']:.1f} / {1000 * alone['batch4_s']:.1f}"
            lines.append(
                f"| {path} | {text} | {pair('forward_s')} | {pair('vae_s')} | "
                f"{row.get('attention_backend', 'native (SDPA)')} |"
            )
        extra = []
        for path in paths:
            row = pipeline.get(path, {})
            if "error" in row:
                extra.append(f"- {path}: failed: {row['error']}")
                continue
            if row.get("attention_ms"):
                timings = ", ".join(
                    f"{k} {v:.2f} ms" for k, v in sorted(row["attention_ms"].items(), key=lambda kv: kv[1])
                )
                extra.append(f"- {path}: attention backends timed at start-up: {timings}")
            if "fp8_rel_error" in row:
                extra.append(
                    f"- {path}: {row['fp8_linears']} linears in fp8; relative error of the transformer "
                    f"output against bf16 on the same inputs: {row['fp8_rel_error']:.4f}"
                )
            if row:
                extra.append(
                    f"- {path}: load {row['load_s']:.1f} s, "
                    f"warm-up (compiles included) {row['warmup_s']:.1f} s"
                    + (
                        f", CUDA graphs of the {' and '.join(graphs).replace('_', ' ')}"
                        if (graphs := row.get("cuda_graphs"))
                        else ""
                    )
                )
        lines += ["", *extra, ""]
    encode = results.get("encode")
    if encode:
        lines += [
            "## Image encoding (1024x1024, one image, milliseconds)",
            "",
            "| Pillow PNG (default settings) | Pillow PNG (level 1) | server PNG | server JPEG |",
            "|---|---|---|---|",
            f"| {1000 * encode['pillow_png_default_s']:.1f} | "
            + (f"{1000 * encode['pillow_png_level1_s']:.1f}" if "pillow_png_level1_s" in encode else "-")
            + f" | {1000 * encode['server_png_s']:.1f} | {1000 * encode['server_jpeg_s']:.1f} |",
            "",
        ]
    served = results.get("http", {})
    if served:
        lines += [
            "## Through HTTP on loopback (default output format png)",
            "",
            "| path | clients | images/s | pipeline batch 4 images/s | HTTP / pipeline | mean batch "
            "| time generating | encode ms/image | start to ready s |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for path, row in served.items():
            own = pipeline.get(path, {}).get("batch4", {}).get("images_per_s")
            lines.append(
                f"| {path} | {row['clients']} | {row['images_per_s']:.2f} | {cell(own, '.2f')} | "
                f"{cell(row['images_per_s'] / own if own else None, '.2f')} | "
                f"{cell(row.get('mean_batch'), '.2f')} | "
                f"{cell(row.get('generating_share'), '.0%')} | {row['encode_ms_per_image']:.1f} | "
                f"{cell(row.get('start_to_ready_s'), '.1f')} |"
            )
        lines.append("")
    cold = results.get("coldstart", {})
    if cold:
        lines += [
            "## Process start to ready (weights already on disk)",
            "",
            "A new replica today starts with an empty compile cache; a container restart keeps the",
            "pod's; a new replica with shared compile artifacts (`compile_artifacts_dir`) starts with",
            "an empty compile cache and loads what the first replica saved.",
            "",
            "| path | new replica s | container restart s | new replica with artifacts s "
            "| of which start (imports, CUDA) / load / tune / warm-up s (with artifacts) "
            "| warm-up calls s (new replica) |",
            "|---|---|---|---|---|---|",
        ]
        for path, row in cold.items():
            shared = row.get("artifacts_phases", {})
            start = cell(shared.get("start"), ".1f")
            inside = [f"{shared[phase]:.1f}" for phase in ("imports", "cuda_init") if phase in shared]
            if inside:
                start += f" ({', '.join(inside)})"
            parts = " / ".join(
                [start] + [cell(shared.get(phase), ".1f") for phase in ("load", "tune", "warmup")]
            )
            calls = "; ".join(row.get("empty_cache_breakdown", {}).get("warmup_calls_s", []))
            lines.append(
                f"| {path} | {cell(row.get('empty_cache_s'), '.1f')} | "
                f"{cell(row.get('warm_cache_s'), '.1f')} | {cell(row.get('artifacts_s'), '.1f')} | "
                f"{parts} | {calls} |"
            )
        lines.append("")
        lines += first_image_table(cold)
    imports = results.get("imports", {}).get("runs", [])
    if imports:
        lines += [
            "## The server's imports (a fresh interpreter each, `python -X importtime`)",
            "",
            "| run | process age at the end s | import work s | by package s |",
            "|---|---|---|---|",
        ]
        for number, run in enumerate(imports, 1):
            packages = ", ".join(f"{name} {seconds:.2f}" for name, seconds in run["by_package_s"].items())
            lines.append(f"| {number} | {run['wall_s']:.1f} | {run['import_s']:.1f} | {packages} |")
        lines.append("")
    return "\n".join(lines)


def first_image_table(cold: dict[str, Any]) -> list[str]:
    """Each start as a client saw it: its first image, Ready, and the first request served by
    the compiled pipeline."""
    rows = [
        (path, run, row[f"{run}_seen"])
        for path, row in cold.items()
        for run in ("empty_cache", "warm_cache", "artifacts")
        if f"{run}_seen" in row
    ]
    if not rows:
        return []
    names = {"empty_cache": "new replica", "warm_cache": "container restart", "artifacts": "with artifacts"}
    lines = [
        "Seen by a client that sends its request again and again from the process's start:",
        "",
        "| path | start | first image served s | Ready s | full speed s | first request's own s "
        "| a request at full speed s |",
        "|---|---|---|---|---|---|---|",
    ]
    for path, run, seen in rows:
        lines.append(
            f"| {path} | {names[run]} | {cell(seen.get('first_image_s'), '.1f')} | "
            f"{cell(seen.get('ready_s'), '.1f')} | {cell(seen.get('full_speed_s'), '.1f')} | "
            f"{cell(seen.get('first_request_s'), '.2f')} | {cell(seen.get('compiled_request_s'), '.2f')} |"
        )
    lines.append("")
    return lines
