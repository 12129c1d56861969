"""`qvlc eval`: a benchmark file scored with the artifacts (and the original model), as VLMEvalKit prompts and
scores it (``qvlc.eval``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table

from qvlc.cli.console import console, err
from qvlc.cli.failures import command
from qvlc.cli.options import EXPECT_DIGEST, VERIFY_HASHES, Digests, trust
from qvlc.system.library_noise import quiet_libraries


def eval_(
    llm_dir: Path = typer.Argument(..., help="LLM artifact folder (`part: llm`)."),
    visual_dir: Path = typer.Argument(..., help="Visual artifact folder (`part: visual`) of the same checkpoint."),
    data: Path = typer.Option(..., "--data", help="Benchmark file: MMBench-layout .tsv, or .jsonl {image, question, "
                              "answer}."),
    reference: bool = typer.Option(False, "--reference", help="Also run the original transformers model (fp32)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Only the first N items."),
    out: Path = typer.Option(Path("results.json"), "--out", help="Where to write the results."),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", help="Tokens per answer (capped at the KV room)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Folder with the tokenizer and template."),
    verify_hashes: Optional[bool] = VERIFY_HASHES,
    expect_digest: Digests = EXPECT_DIGEST,
) -> None:
    """Score a benchmark with the artifacts (and the original model), as VLMEvalKit prompts and scores it."""
    quiet_libraries()
    from rich.progress import Progress

    from qvlc.eval.evaluate import evaluate

    with command(f"qvlc eval of {data}"), Progress(console=err, transient=True) as bar:
        def progress(total: int):
            task = bar.add_task("items", total=total)
            return lambda done: bar.update(task, completed=done)

        res = evaluate(llm_dir, visual_dir, data, out, reference=reference, limit=limit,
                       max_new_tokens=max_new_tokens, checkpoint=checkpoint,
                       trust=trust(verify_hashes, expect_digest), progress=progress)
    t = Table(title=f"{res['items']} items · {data.name}")
    for col in ("category", "items", "accuracy", *(("reference", "agreement") if reference else ())):
        t.add_column(col, justify="left" if col == "category" else "right")
    for cat, row in {**res["per_category"], "all": {**res, "items": res["items"]}}.items():
        ref = (f"{row['reference_accuracy']:.3f}", f"{res['agreement']:.3f}" if cat == "all" else "") if reference \
            else ()
        t.add_row(escape(cat), str(row["items"]), f"{row['accuracy']:.3f}", *ref)
    console.print(t)
    ttft = res["time_to_first_token_s"]["median"]
    console.print(f"[dim]first token {ttft or 0:.2f} s (median) · "
                  f"{res['decode_tokens_per_second']['median'] or 0:.1f} tokens/s · {res['errors']} items the "
                  f"artifacts could not take · results in {escape(str(out))}[/]")
