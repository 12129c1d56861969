"""`qvlc compile`: one part of a checkpoint into an artifact folder, then its proof."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.text import Text

from qvlc import __version__
from qvlc.cli.console import RichProgress, console, problem
from qvlc.cli.failures import command
from qvlc.cli.parity_table import parity_table
from qvlc.errors import printable
from qvlc.system.library_noise import quiet_libraries


def compile(
    config: Path = typer.Argument(..., help="YAML config (native or vamc-style)."),
    force: bool = typer.Option(False, "--force", help="Replace an existing artifact folder."),
    output_dir: Optional[Path] = typer.Option(None, "--output-dir", "-o", help="Override output.dir."),
) -> None:
    """Compile one part (llm or visual) of a checkpoint into an artifact folder, then prove it."""
    quiet_libraries()
    from dataclasses import replace

    from qvlc.compile.stages import compile_artifact
    from qvlc.config.loading import load_config
    from qvlc.config.schema import OutputConfig

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
