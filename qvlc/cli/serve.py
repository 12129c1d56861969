"""`qvlc serve`: the artifacts behind an OpenAI-compatible chat completions API (``qvlc.serve``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.text import Text

from qvlc.cli.console import console
from qvlc.cli.failures import command
from qvlc.cli.options import EXPECT_DIGEST, VERIFY_HASHES, Digests, trust
from qvlc.errors import QvlcError
from qvlc.runtime.media import MAX_IMAGE_PIXELS
from qvlc.system.library_noise import quiet_libraries


def serve(
    llm_dir: Path = typer.Argument(..., help="LLM artifact folder (`part: llm`)."),
    visual_dir: Path = typer.Argument(..., help="Visual artifact folder (`part: visual`) of the same checkpoint."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (loopback by default)."),
    port: int = typer.Option(8000, "--port", help="Port to listen on (0: any free port)."),
    model_name: Optional[str] = typer.Option(None, "--model-name", help="Model id (default: LLM_DIR's name)."),
    max_queue: int = typer.Option(16, "--max-queue", help="Requests waiting or running before 429."),
    media_dir: Optional[Path] = typer.Option(None, "--media-dir", help="Allow file:// image URLs inside this folder."),
    max_image_pixels: int = typer.Option(MAX_IMAGE_PIXELS, "--max-image-pixels", help="Refuse larger images (header)."),
    checkpoint: Optional[Path] = typer.Option(None, "--checkpoint", help="Folder with the tokenizer and template."),
    verify_hashes: Optional[bool] = VERIFY_HASHES,
    expect_digest: Digests = EXPECT_DIGEST,
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
        options = ServeOptions(host=host, port=port, model_name=model_name, max_queue=max_queue, limits=limits,
                               checkpoint=checkpoint, trust=trust(verify_hashes, expect_digest))
        run_server(llm_dir, visual_dir, options, ready)
    console.print("qvlc serve: stopped")
