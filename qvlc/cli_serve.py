"""`qvlc serve` and `qvlc eval`: the commands over ``qvlc.serve`` (registered on the app in ``qvlc.cli``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from qvlc.cli_common import EXPECT_DIGEST, Digests, command, console, err
from qvlc.errors import QvlcError
from qvlc.quiet import quiet_libraries


def serve(
    llm_dir: Path = typer.Argument(..., help="LLM artifact folder (`part: llm`)."),
    visual_dir: Path = typer.Argument(..., help="Visual artifact folder (`part: visual`) of the same checkpoint."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (loopback by default)."),
    port: int = typer.Option(8000, "--port", help="Port to listen on (0: any free port)."),
    model_name: Optional[str] = typer.Option(None, "--model-name", help="Model id (default: LLM_DIR's name)."),
    max_queue: int = typer.Option(16, "--max-queue", help="Requests waiting or running before 429."),
    media_dir: Optional[Path] = typer.Option(None, "--media-dir", help="Allow file:// image URLs inside this folder."),
    max_image_pixels: int = typer.Option(50_000_000, "--max-image-pixels", help="Refuse larger images (header)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Folder with the tokenizer and template."),
    verify_hashes: Optional[bool] = typer.Option(None, "--verify-hashes/--no-verify-hashes",
                                                 help="sha256 every artifact file before serving."),
    expect_digest: Digests = EXPECT_DIGEST,
) -> None:
    """Serve the artifacts behind an OpenAI-compatible chat completions API (greedy decoding)."""
    quiet_libraries()
    from qvlc.integrity import check_digest_options
    from qvlc.serve.media import MediaLimits
    from qvlc.serve.server import ServeOptions
    from qvlc.serve.server import serve as run_server

    def ready(url: str) -> None:
        console.print(Text(f"qvlc serve: ready on {url} (POST /chat/completions; Ctrl-C stops)"), soft_wrap=True)
        console.file.flush()

    with command(f"qvlc serve on {llm_dir} and {visual_dir}"):
        if max_image_pixels < 1:
            raise QvlcError(f"--max-image-pixels is {max_image_pixels}", fix="use a positive pixel count",
                            key="--max-image-pixels")
        if media_dir is not None and not media_dir.is_dir():
            raise QvlcError(f"--media-dir {str(media_dir)!r} is not a folder", fix="pass an existing folder",
                            key="--media-dir")
        limits = MediaLimits(max_pixels=max_image_pixels, media_dir=media_dir)
        digests = check_digest_options(expect_digest)
        run_server(llm_dir, visual_dir, ServeOptions(host, port, model_name, max_queue, limits, checkpoint,
                                                     verify_hashes, digests), ready)
    console.print("qvlc serve: stopped")


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
) -> None:
    """Score a benchmark with the artifacts (and the original model), as VLMEvalKit prompts and scores it."""
    quiet_libraries()
    from rich.progress import Progress

    from qvlc.serve.eval import evaluate

    with command(f"qvlc eval of {data}"), Progress(console=err, transient=True) as bar:
        def progress(total: int):
            task = bar.add_task("items", total=total)
            return lambda done: bar.update(task, completed=done)

        res = evaluate(llm_dir, visual_dir, data, out, reference, limit, max_new_tokens, checkpoint, progress)
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
