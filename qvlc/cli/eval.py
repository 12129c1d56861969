"""`qvlc eval`: a benchmark file scored with the artifacts (and the original model), as VLMEvalKit prompts and
scores it (``qvlc.eval``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from qvlc.cli.console import console, err
from qvlc.cli.failures import command
from qvlc.cli.options import EXPECT_DIGEST, VERIFY_HASHES, Digests, trust
from qvlc.errors import QvlcError
from qvlc.system.library_noise import quiet_libraries


def eval_(
    llm_dir: Path = typer.Argument(..., help="LLM artifact folder (`part: llm`)."),
    visual_dir: Path = typer.Argument(..., help="Visual artifact folder (`part: visual`) of the same checkpoint."),
    data: Path = typer.Option(..., "--data", help="Benchmark file: MMBench-layout .tsv, or .jsonl {image, question, "
                              "answer}."),
    reference: bool = typer.Option(False, "--reference", help="Also run the original transformers model (fp32)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N questions (each with all its "
                                        "circular copies)."),
    out: Path = typer.Option(Path("results.json"), "--out", help="Where to write the results."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Tokens per answer (capped at the KV room)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Folder with the tokenizer and template."),
    min_pixels: Optional[int] = typer.Option(None, "--min-pixels", help="Upscale smaller images to this many pixels "
                                             "(default: preprocess.json's)."),
    max_pixels: Optional[int] = typer.Option(None, "--max-pixels", help="Downscale larger images (clamped to what the "
                                             "visual artifact holds)."),
    preset: Optional[str] = typer.Option(None, "--preset", help="vlmevalkit: VLMEvalKit's Qwen2-VL image setting "
                                         "(min 1280·28·28, max 16384·28·28 pixels)."),
    verify_hashes: Optional[bool] = VERIFY_HASHES,
    expect_digest: Digests = EXPECT_DIGEST,
) -> None:
    """Score a benchmark with the artifacts (and the original model), as VLMEvalKit prompts and scores it."""
    quiet_libraries()
    from rich.progress import Progress

    from qvlc.eval.evaluate import PRESETS, evaluate

    with command(f"qvlc eval of {data}"), Progress(console=err, transient=True) as bar:
        if preset is not None:
            if preset not in PRESETS:
                raise QvlcError(f"--preset {preset!r:.40} is not one qvlc knows", fix=f"use one of {sorted(PRESETS)}",
                                key="--preset")
            min_pixels, max_pixels = min_pixels or PRESETS[preset][0], max_pixels or PRESETS[preset][1]
        def progress(total: int):
            task = bar.add_task("items", total=total)
            return lambda done: bar.update(task, completed=done)

        res = evaluate(llm_dir, visual_dir, data, out, reference=reference, limit=limit,
                       max_new_tokens=max_new_tokens, checkpoint=checkpoint,
                       trust=trust(verify_hashes, expect_digest), min_pixels=min_pixels, max_pixels=max_pixels,
                       progress=progress)
    _print_results(res, data, out, reference)


def _print_results(res: dict, data: Path, out: Path, reference: bool) -> None:
    if res["image_settings"]["clamped"]:
        console.print(Text(f"note: {res['image_settings']['clamped']}", style="yellow"), soft_wrap=True)
    t = Table(title=f"{res['questions']} questions ({res['items']} rows) · {data.name} · {res['metric']} accuracy")
    for col in ("category", "questions", "accuracy", *(("reference",) if reference else ())):
        t.add_column(col, justify="left" if col == "category" else "right")
    overall = {"questions": res["questions"], "accuracy": res["accuracy"], "reference_accuracy":
               res.get("reference_accuracy")}
    for cat, row in {**res["by_category"], "all": overall}.items():
        t.add_row(escape(cat), str(row["questions"]), f"{row['accuracy']:.3f}",
                  *((f"{row['reference_accuracy']:.3f}",) if reference else ()))
    console.print(t)
    if res["metric"] == "circular":
        console.print(f"[dim]vanilla: {res['vanilla_0_accuracy']:.3f} on the original rows, "
                      f"{res['vanilla_all_accuracy']:.3f} on every row[/]")
    if reference:
        console.print(f"[dim]agreement with the original model: {res['agreement']:.3f} of rows name the same option, "
                      f"{res['question_agreement']:.3f} of questions are scored the same[/]")
    ttft = res["time_to_first_token_s"]["median"]
    console.print(f"[dim]first token {ttft or 0:.2f} s (median) · "
                  f"{res['decode_tokens_per_second']['median'] or 0:.1f} tokens/s · {res['resized']} images resized to "
                  f"fit · {res['errors']} items the artifacts could not take · results in {escape(str(out))}[/]")
