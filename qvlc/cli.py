"""The `qvlc` command line: parses, prints, decides exit codes. No compiler work happens here.

Exit codes (``qvlc.errors``): 0 success · 1 parity or integrity failure · 2 bad input · 3 environment (disk full,
read-only, permission) · 4 internal error (traceback in a log file) · 130/143 interrupted by SIGINT/SIGTERM.
User text (paths, values, prompts) is never read as rich markup.
"""

from __future__ import annotations

import contextlib
import shutil
import time
from pathlib import Path
from typing import Iterator, Optional

import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from qvlc import __version__
from qvlc.errors import EXIT_FAILED, QvlcError
from qvlc.guard import Exit, guarded
from qvlc.quiet import quiet_libraries

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compile Qwen2-VL-family checkpoints into statically shaped ONNX artifacts, proven against "
                       "PyTorch.")
# Not on a terminal (CI logs), rich would assume 80 columns and truncate the parity table.
_WIDTH = max(shutil.get_terminal_size((120, 24)).columns, 110)
console = Console(highlight=False, width=_WIDTH)
err = Console(stderr=True, highlight=False, width=_WIDTH)

STYLES = {"error": "bold red", "parity failed": "bold red", "integrity": "bold red", "environment": "bold red",
          "interrupted": "bold yellow", "internal error": "bold magenta"}


class RichProgress:
    """One line per stage: a spinner while it runs, then its wall time."""

    @contextlib.contextmanager
    def stage(self, name: str) -> Iterator[dict]:
        t0 = time.perf_counter()
        info: dict = {}
        with console.status(Text(f"{name} …", style="bold"), spinner="dots"):
            yield info
        detail = f"  {info['detail']}" if info.get("detail") else ""
        console.print(Text("✓ ", style="green") + Text(f"{name:<20} {time.perf_counter() - t0:7.1f} s{detail}"))


def report(kind: str, text: str) -> None:
    """One failure message on stderr; ``text`` is printed as is (never as markup)."""
    err.print(Text(f"{kind}: ", style=STYLES.get(kind, "bold red")) + Text(text), soft_wrap=True)


@contextlib.contextmanager
def command(action: str) -> Iterator[None]:
    """A command body: every failure becomes one message and its documented exit code."""
    try:
        with guarded(action, report):
            yield
    except Exit as e:
        raise typer.Exit(e.code) from None


def parity_table(report) -> Table:
    """Worst value per graph and output over all cases, and greedy-token agreement."""
    t = Table(title=f"parity vs transformers fp32 ({report.part}, {report.dtype})")
    for col in ("graph", "output", "cases", "max abs", "rel L2", "min cosine", "result"):
        t.add_column(col, justify="right" if col in ("cases", "max abs", "rel L2", "min cosine") else "left")
    rows: dict[tuple[str, str], list] = {}
    for c in report.checks:
        rows.setdefault((c.graph, c.output), []).append(c)
    for (graph, output), checks in rows.items():
        ms = [c.metrics for c in checks if c.metrics]
        ok = all(c.passed for c in checks)
        if ms:
            t.add_row(escape(graph), escape(output), str(len(checks)), f"{max(m['max_abs'] for m in ms):.2e}",
                      f"{max(m['rel_l2'] for m in ms):.2e}", f"{min(m['cosine'] for m in ms):.7f}",
                      "[green]pass[/]" if ok else "[red]FAIL[/]")
        else:
            t.add_row(escape(graph), escape(output), str(len(checks)), "", "", "", "[red]FAIL[/]")
    for tk in report.tokens:
        res = "[green]pass[/]" if tk.expected == tk.got else ("[red]FAIL[/]" if tk.required else "[yellow]reported[/]")
        t.add_row(escape(tk.graph), escape(f"greedy {tk.case}"), "1", "", "", f"{tk.matched}/{len(tk.expected)} tokens",
                  res)
    from qvlc.validate.metrics import quantization_groups  # loaded already: the report is one

    for graph, output, rs in quantization_groups(report.quantization):  # the second proof, at its own floor
        floor = report.quantization["min_cosine"]
        t.add_row(escape(graph), escape(f"{output} vs unquantized (≥ {floor})"), str(len(rs)),
                  f"{max(r['max_abs'] for r in rs):.2e}", f"{max(r['rel_l2'] for r in rs):.2e}",
                  f"{min(r['cosine'] for r in rs):.7f}",
                  "[green]pass[/]" if all(r["passed"] for r in rs) else "[red]FAIL[/]")
    return t


@app.command()
def compile(
    config: Path = typer.Argument(..., help="YAML config (native or vamc-style)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing artifact folder."),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-o", help="Override output.dir."),
) -> None:
    """Compile one part (llm or visual) of a checkpoint into an artifact folder, then prove it."""
    quiet_libraries()
    from dataclasses import replace

    from qvlc.config import OutputConfig, load_config
    from qvlc.pipeline import compile_artifact

    with command(f"the compile of {config}"):
        cfg = load_config(config)
        if output_dir is not None:
            cfg = replace(cfg, output=OutputConfig(dir=str(output_dir)))
        for key in cfg.ignored:
            err.print(Text("note: ", style="yellow") + Text(f"{key} has no meaning for qvlc and is ignored"),
                      soft_wrap=True)
        console.print(f"qvlc {__version__} · compiling {cfg.name} (part {cfg.part}, {cfg.export.dtype}"
                      f"{f', tp {cfg.export.tp}' if cfg.part == 'llm' else ''}) from {cfg.model.checkpoint}",
                      markup=False, soft_wrap=True)
        result = compile_artifact(cfg, force=force, progress=RichProgress())
    if result.report is not None:
        console.print(parity_table(result.report))
    mb = result.export.bytes_written / 1e6
    console.print(Text("done", style="bold green") + Text(f" → {result.folder}  ({mb:.1f} MB written)"))


@app.command()
def validate(
    artifact: Path = typer.Argument(..., help="An artifact folder written by `qvlc compile`."),
    runtime: list[str] = typer.Option([], "--runtime", help="Also run the cases on this runtime (tvm), beside "
                                      "onnxruntime; repeatable. Default: the runtimes the artifact was compiled with."),
) -> None:
    """Re-run the parity check of an existing artifact against its source checkpoint."""
    quiet_libraries()
    from qvlc.pipeline import validate_artifact

    with command(f"the validation of {artifact}"):
        parity = validate_artifact(artifact, progress=RichProgress(), runtimes=tuple(runtime) or None)
    console.print(parity_table(parity))
    if not parity.passed:
        for f in parity.failures:
            err.print(Text("✗ ", style="red") + Text(f), soft_wrap=True)
        if parity.cause:
            err.print(Text("→ ", style="yellow") + Text(parity.cause), soft_wrap=True)
        raise typer.Exit(EXIT_FAILED)
    console.print("[bold green]parity holds[/]")


@app.command()
def verify(artifact: Path = typer.Argument(..., help="An artifact folder written by `qvlc compile`.")) -> None:
    """Check that every file still matches the size and sha256 recorded in manifest.json."""
    from qvlc.artifacts import verify as verify_folder

    with command(f"the verification of {artifact}"):
        result = verify_folder(artifact)
    if result.problems:
        for p in result.problems:
            err.print(Text("✗ ", style="red") + Text(p), soft_wrap=True)
        raise typer.Exit(EXIT_FAILED)
    console.print(Text("✓ ", style="green") + Text(f"{result.checked} files match manifest.json"))


@app.command()
def run(
    llm_dir: Path = typer.Argument(..., help="LLM artifact folder (`part: llm`)."),
    visual_dir: Path = typer.Argument(..., help="Visual artifact folder (`part: visual`) of the same checkpoint."),
    image: Optional[list[Path]] = typer.Option(None, "--image", "-i", help="Image file; repeat for several."),
    video: Optional[list[Path]] = typer.Option(
        None, "--video", "-v", help="Video file or folder of frames; repeat for several (after the images)."),
    prompt: str = typer.Option(..., "--prompt", "-p", help="The user's question or instruction."),
    fps: float = typer.Option(2.0, "--fps", help="Video frames sampled per second (the Qwen processors' default)."),
    frames_fps: float = typer.Option(2.0, "--frames-fps", help="Frame rate of a folder of frames."),
    max_new_tokens: int = typer.Option(32, "--max-new-tokens", "-n", help="Stop after this many new tokens."),
    checkpoint: Optional[Path] = typer.Option(
        None, "--checkpoint", help="Folder with the tokenizer and chat template (default: the LLM manifest's)."),
    verify_hashes: Optional[bool] = typer.Option(
        None, "--verify-hashes/--no-verify-hashes",
        help="sha256 every artifact file before use (default: when an artifact is at most 4 GB)."),
) -> None:
    """Answer a prompt about images and videos with the compiled graphs in ONNX Runtime, streaming the text."""
    quiet_libraries()
    from rich.control import strip_control_codes

    from qvlc.runtime.media import load_image, load_video
    from qvlc.runtime.vlm import VlmPipeline

    def stream(_token: int, text: str) -> None:
        if text:
            console.print(strip_control_codes(text), end="", markup=False, highlight=False, soft_wrap=True)

    with command(f"qvlc run on {llm_dir} and {visual_dir}"):
        if not (fps > 0 and frames_fps > 0):
            raise QvlcError(f"--fps {fps} and --frames-fps {frames_fps} must be positive", fix="use e.g. --fps 2",
                            key="--fps")
        images = [load_image(p) for p in image or []]  # bad image paths fail before anything is loaded
        pipe = VlmPipeline(llm_dir, visual_dir, checkpoint, verify_hashes)
        tps = pipe.preprocess.temporal_patch_size
        videos = [load_video(p, frames_fps, tps, fps) for p in video or []]
        result = pipe.generate(images, prompt, max_new_tokens=max_new_tokens, on_token=stream, videos=videos)
    stop = "end of turn" if result.stopped_at_eos else "max new tokens"
    console.print()
    console.print(f"[dim]{len(result.tokens)} tokens ({stop}) · prompt {result.prompt_tokens} tokens "
                  f"({result.image_tokens} vision, {len(images)} image{'s' * (len(images) != 1)}, "
                  f"{len(videos)} video{'s' * (len(videos) != 1)}) · "
                  f"first token {result.time_to_first_token:.2f} s · "
                  f"{result.decode_tokens_per_second:.1f} tokens/s[/]")


@app.command()
def serve(
    llm_dir: Path = typer.Argument(..., help="LLM artifact folder (`part: llm`)."),
    visual_dir: Path = typer.Argument(..., help="Visual artifact folder (`part: visual`) of the same checkpoint."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (loopback by default)."),
    port: int = typer.Option(8000, "--port", help="Port to listen on (0: any free port)."),
    model_name: Optional[str] = typer.Option(None, "--model-name", help="Model id to report (default: LLM_DIR's name)."),
    max_queue: int = typer.Option(16, "--max-queue", help="Requests waiting or running before 429."),
    media_dir: Optional[Path] = typer.Option(None, "--media-dir", help="Allow file:// image URLs inside this folder."),
    max_image_pixels: int = typer.Option(50_000_000, "--max-image-pixels", help="Refuse larger images (header)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Folder with the tokenizer and template."),
    verify_hashes: Optional[bool] = typer.Option(None, "--verify-hashes/--no-verify-hashes",
                                                 help="sha256 every artifact file before serving."),
) -> None:
    """Serve the artifacts behind an OpenAI-compatible chat completions API (greedy decoding)."""
    quiet_libraries()
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
        run_server(llm_dir, visual_dir, ServeOptions(host, port, model_name, max_queue, limits, checkpoint,
                                                     verify_hashes), ready)
    console.print("qvlc serve: stopped")


@app.command("eval")
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


@app.command()
def version() -> None:
    """Print qvlc's version and the libraries it was tested with."""
    from qvlc.artifacts import library_versions

    console.print(f"qvlc {__version__}")
    for name, v in library_versions().items():
        console.print(f"  {name} {v}")


def main() -> None:
    app()
