"""`qvlc run`: a prompt about images and videos answered by the compiled graphs, streamed to the terminal."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from qvlc.cli.console import console
from qvlc.cli.failures import command
from qvlc.cli.options import EXPECT_DIGEST, VERIFY_HASHES, Digests, trust
from qvlc.errors import QvlcError
from qvlc.system.library_noise import quiet_libraries


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
    verify_hashes: Optional[bool] = VERIFY_HASHES,
    expect_digest: Digests = EXPECT_DIGEST,
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
        pipe = VlmPipeline(llm_dir, visual_dir, checkpoint=checkpoint,
                           trust=trust(verify_hashes, expect_digest))
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
