"""The one resolver of a checkpoint name: the embedded tiny default (``tiny``, ``tiny:<model_type>``), built on
first use, or a local folder path (whose contents ``qvlc.checkpoint.inspect`` checks)."""

from __future__ import annotations

from pathlib import Path

from qvlc.models import tiny_family


def checkpoint_folder(name: str, seed: int | None = None) -> Path:
    """The folder ``name`` stands for; a tiny default is built with ``seed`` (default: the shipped seed)."""
    tiny = tiny_family(name)
    if tiny is None:
        return Path(name).expanduser()
    from qvlc.checkpoint.tiny import (  # torch: only when a tiny model is built
        TINY_SEED,
        tiny_checkpoint,
    )

    return tiny_checkpoint(seed=seed or TINY_SEED, family=tiny)
