"""The `qvlc` command line: parses, prints, decides exit codes. No compiler work happens here.

Exit codes (``qvlc.errors``): 0 success · 1 parity or integrity failure · 2 bad input · 3 environment (disk full,
read-only, permission) · 4 internal error (traceback in a log file) · 130/143 interrupted by SIGINT/SIGTERM.
User text (paths, values, prompts) is never read as rich markup.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape
from rich.table import Table
from rich.text import Text

from qvlc import __version__
from qvlc.cli_common import (
    EXPECT_DIGEST,
    Digests,
    RichProgress,
    command,
    console,
    problem,
)
from qvlc.cli_serve import eval_, serve
from qvlc.errors import EXIT_FAILED, QvlcError, printable
from qvlc.quiet import quiet_libraries

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Compile Qwen2-VL-family checkpoints into statically shaped ONNX artifacts, proven against "
                       "PyTorch.")
app.command()(serve)
app.command("eval")(eval_)


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
    from qvlc.validate.metrics import (
        quantization_groups,  # loaded already: the report is one
    )

    for graph, output, rs in quantization_groups(report.quantization):  # the second proof, at its own floor
        floor = report.quantization["min_cosine"]
        t.add_row(escape(graph), escape(f"{output} vs unquantized (≥ {floor})"), str(len(rs)),
                  f"{max(r['max_abs'] for r in rs):.2e}", f"{max(r['rel_l2'] for r in rs):.2e}",
                  f"{min(r['cosine'] for r in rs):.7f}",
                  "[green]pass[/]" if all(r["passed"] for r in rs) else "[red]FAIL[/]")
    if report.phases:  # where the validation's time went (not in the artifact: timings differ run to run)
        t.caption = "validation: " + " · ".join(f"{escape(p['phase'])} {p['seconds']:.0f} s ({p['read_gb']:.1f} GB "
                                                 "read)" for p in report.phases)
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
            problem(f"{printable(key, 120)} has no meaning for qvlc and is ignored", "note: ", "yellow")
        console.print(printable(f"qvlc {__version__} · compiling {cfg.name} (part {cfg.part}, {cfg.export.dtype}"
                                f"{f', tp {cfg.export.tp}' if cfg.part == 'llm' else ''}) from {cfg.model.checkpoint}"),
                      markup=False, soft_wrap=True)
        result = compile_artifact(cfg, force=force, progress=RichProgress())
    if result.report is not None:
        console.print(parity_table(result.report))
    mb = result.export.bytes_written / 1e6
    console.print(Text("done", style="bold green") + Text(printable(f" → {result.folder}  ({mb:.1f} MB written)")))
    if result.digest:  # what CI pins: `qvlc verify/run/validate/serve --expect-digest`
        console.print(Text(f"digest {result.digest}  (sha256 of manifest.json)"))


@app.command()
def validate(
    artifact: Path = typer.Argument(..., help="An artifact folder written by `qvlc compile`."),
    runtime: list[str] = typer.Option([], "--runtime", help="Also run the cases on this runtime (tvm), beside "
                                      "onnxruntime; repeatable. Default: the runtimes the artifact was compiled with."),
    expect_digest: Digests = EXPECT_DIGEST,
) -> None:
    """Re-run the parity check of an existing artifact against its source checkpoint."""
    quiet_libraries()
    from qvlc.integrity import check_digest_options
    from qvlc.pipeline import validate_artifact

    with command(f"the validation of {artifact}"):
        parity = validate_artifact(artifact, progress=RichProgress(), runtimes=tuple(runtime) or None,
                                   expect_digest=check_digest_options(expect_digest))
    console.print(parity_table(parity))
    if not parity.passed:
        for f in parity.failures:
            problem(f)
        if parity.cause:
            problem(parity.cause, "→ ", "yellow")
        raise typer.Exit(EXIT_FAILED)
    console.print("[bold green]parity holds[/]")


@app.command()
def verify(artifact: Path = typer.Argument(..., help="An artifact folder written by `qvlc compile`."),
           expect_digest: Digests = EXPECT_DIGEST) -> None:
    """Check that every file still matches the size and sha256 recorded in manifest.json."""
    from qvlc.integrity import check_digest_options
    from qvlc.integrity import verify as verify_folder

    with command(f"the verification of {artifact}"):
        result = verify_folder(artifact, check_digest_options(expect_digest))
    if result.problems:
        for p in result.problems:
            problem(p)
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
    expect_digest: Digests = EXPECT_DIGEST,
) -> None:
    """Answer a prompt about images and videos with the compiled graphs in ONNX Runtime, streaming the text."""
    quiet_libraries()
    from rich.control import strip_control_codes

    from qvlc.integrity import check_digest_options
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
        pipe = VlmPipeline(llm_dir, visual_dir, checkpoint, verify_hashes, check_digest_options(expect_digest))
        tps = pipe.preprocess.temporal_patch_size
        videos = [load_video(p, frames_fps, tps, fps, pipe.preprocess.video_sampling) for p in video or []]
        result = pipe.generate(images, prompt, max_new_tokens=max_new_tokens, on_token=stream, videos=videos)
    stop = "end of turn" if result.stopped_at_eos else "max new tokens"
    console.print()
    console.print(f"[dim]{len(result.tokens)} tokens ({stop}) · prompt {result.prompt_tokens} tokens "
                  f"({result.image_tokens} vision, {len(images)} image{'s' * (len(images) != 1)}, "
                  f"{len(videos)} video{'s' * (len(videos) != 1)}) · "
                  f"first token {result.time_to_first_token:.2f} s · "
                  f"{result.decode_tokens_per_second:.1f} tokens/s[/]")


@app.command()
def version() -> None:
    """Print qvlc's version and the libraries it was tested with."""
    from qvlc.artifacts import library_versions

    console.print(f"qvlc {__version__}")
    for name, v in library_versions().items():
        console.print(f"  {name} {v}")


def main() -> None:
    app()
