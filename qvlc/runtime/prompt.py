"""What a prompt becomes on the host, and what a generation returns: the checkpoint folder an artifact names, the
prepared prompt (ids and patches), the result, and the visual rows split into embedding and DeepStack rows."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qvlc.artifact.manifest import Manifest
from qvlc.checkpoint.resolve import checkpoint_folder
from qvlc.errors import QvlcError


def resolve_checkpoint(manifest: Manifest, override: Path | str | None = None) -> Path:
    """The checkpoint folder holding the tokenizer, chat template and config.json of an artifact.

    ``override`` wins; else the manifest's ``config.model.checkpoint`` ("tiny…" → that embedded default with the
    manifest's seed). QvlcError when the folder is gone (e.g. an artifact compiled on another machine).
    """
    if override is not None:
        name, where = str(override), "--checkpoint"
    else:
        name, where = str(manifest.source.checkpoint), "model.checkpoint"
    folder = checkpoint_folder(name, manifest.source.tiny_seed)
    if not folder.is_dir():
        raise QvlcError(f"checkpoint folder {str(folder)!r} does not exist",
                        fix="pass --checkpoint FOLDER: a folder with the checkpoint's config.json, tokenizer files "
                            "and chat template", key=where)
    return folder


@dataclass(frozen=True)
class VlmPrompt:
    """A chat prompt ready for the graphs: token ids with the vision pads expanded, and every image's and
    video's patches in prompt order."""

    text: str  # the chat-templated text, one pad token per image/video (before expansion)
    input_ids: np.ndarray  # int64 [n], unpadded
    items: tuple[tuple[str, np.ndarray, np.ndarray], ...]  # ("image"|"video", pixel_values, grid_thw), prompt order
    second_per_grid_ts: tuple[float, ...]  # per video
    image_tokens: int  # vision pad tokens in input_ids (images and videos): sum(t*h*w) / merge²

    def grids(self, kind: str) -> np.ndarray:
        """grid_thw rows [k, 3] of the images or videos, in prompt order."""
        g = [grid for k, _, grid in self.items if k == kind]
        return np.stack(g) if g else np.zeros((0, 3), dtype=np.int64)

    def pixels(self, kind: str, patch_dim: int) -> np.ndarray:
        """Their patches concatenated [sum t*h*w, patch_dim] (what the processors return as pixel_values(_videos))."""
        p = [px for k, px, _ in self.items if k == kind]
        return np.concatenate(p) if p else np.zeros((0, patch_dim), dtype=np.float32)


@dataclass
class VlmResult:
    """What one generation produced, with its timings (seconds, from the call to ``generate``)."""

    tokens: list[int]  # generated ids, the stop token included when it was generated
    text: str  # detokenized, special tokens skipped
    prompt_tokens: int
    image_tokens: int
    stopped_at_eos: bool
    time_to_first_token: float  # preprocessing + visual graph + prefill
    seconds: float

    @property
    def decode_tokens_per_second(self) -> float:
        """Tokens after the first one per second of decoding (0 when only one token was generated)."""
        t = self.seconds - self.time_to_first_token
        return (len(self.tokens) - 1) / t if len(self.tokens) > 1 and t > 0 else 0.0


def split_deepstack(rows: np.ndarray | None, hidden: int) -> tuple[np.ndarray | None, np.ndarray | None]:
    """The visual graph's rows [n, H × (1 + k)] → (embedding rows [n, H], DeepStack rows [k, n, H] or None)."""
    if rows is None:
        return None, None
    deep = rows[:, hidden:].reshape(len(rows), -1, hidden).transpose(1, 0, 2) if rows.shape[1] > hidden else None
    return rows[:, :hidden], deep
