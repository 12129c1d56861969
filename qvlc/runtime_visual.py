"""ONNX Runtime for the visual artifact: patches (or images) → merged image embeddings, used by `qvlc run` and
by validation.

The host side does what the static graph cannot: pad the patches to N, build the vision cos/sin and the
block-diagonal mask for the grids (``qvlc.host.vision``), then keep the real rows of the outputs and concatenate the
``image_embeds_i`` column chunks.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt
import onnxruntime as ort

from qvlc.artifacts import read_manifest
from qvlc.errors import QvlcError
from qvlc.host.embeddings import NP_DTYPES
from qvlc.host.preprocess import ImageLike, PreprocessConfig, images_to_patches
from qvlc.host.vision import fit_grids, vision_attention_mask, vision_cos_sin
from qvlc.runtime import session_options

VISUAL = "visual.onnx"
VISUAL_WEIGHTS = "visual_weights.data"
PREPROCESS = "preprocess.json"


@dataclass(frozen=True)
class VisualSpec:
    """What a runtime needs to know about a visual artifact; the manifest's ``visual`` section."""

    max_patches: int  # N
    patch_dim: int  # values per flattened patch (1176)
    head_dim: int  # Dv, width of cos/sin
    merge_size: int
    out_hidden: int  # width of the concatenated embedding
    chunk_widths: tuple[int, ...]  # widths of image_embeds_0 … image_embeds_{k-1}
    dtype: str  # export dtype of pixel_values, cos, sin and the outputs
    rope_theta: float = 10000.0
    attention_mask: str = "bool [1, N, N], True = may attend; block-diagonal per frame; padding rows see themselves"

    @property
    def merge_unit(self) -> int:
        return self.merge_size**2

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(f"image_embeds_{i}" for i in range(len(self.chunk_widths)))

    def to_dict(self) -> dict:
        return {**self.__dict__, "chunk_widths": list(self.chunk_widths), "merge_unit": self.merge_unit,
                "tokens": self.max_patches // self.merge_unit, "inputs": ["pixel_values", "attention_mask", "cos",
                                                                           "sin"],
                "outputs": list(self.output_names), "graph": VISUAL, "weights": VISUAL_WEIGHTS,
                "preprocess": PREPROCESS}

    @classmethod
    def from_manifest(cls, manifest: dict) -> "VisualSpec":
        if "visual" not in manifest:
            raise QvlcError("the manifest has no 'visual' section", fix="give the folder of a `part: visual` artifact")
        s = manifest["visual"]
        return cls(s["max_patches"], s["patch_dim"], s["head_dim"], s["merge_size"], s["out_hidden"],
                   tuple(s["chunk_widths"]), s["dtype"], s["rope_theta"], s["attention_mask"])


class VisualRuntime:
    """visual.onnx in ONNX Runtime, with the host-side padding, cos/sin and mask."""

    def __init__(self, folder: Path, spec: VisualSpec | None = None) -> None:
        self.folder = Path(folder)
        self.spec = spec or VisualSpec.from_manifest(read_manifest(self.folder))
        self.preprocess = PreprocessConfig.from_json((self.folder / PREPROCESS).read_text())
        self.session = ort.InferenceSession(str(self.folder / VISUAL), session_options(),
                                            providers=["CPUExecutionProvider"])
        self.np_dtype = NP_DTYPES[self.spec.dtype]

    def feeds(self, pixel_values: np.ndarray, grids: npt.ArrayLike) -> dict[str, np.ndarray]:
        """The graph inputs for real patches ``pixel_values`` [n, patch_dim] with ``grids`` (t, h, w) rows.

        Raises QvlcError when the patches exceed N or do not match the grids.
        """
        s = self.spec
        arr = fit_grids(grids, s.max_patches)
        n = int(arr.prod(axis=1).sum())
        if pixel_values.ndim != 2 or pixel_values.shape != (n, s.patch_dim):
            raise QvlcError(f"pixel_values has shape {list(pixel_values.shape)}, but grids {arr.tolist()} need "
                            f"[{n}, {s.patch_dim}]", fix="pass the patches and grid_thw from the same preprocessing",
                            key="pixel_values")
        padded = np.zeros((s.max_patches, s.patch_dim), dtype=self.np_dtype)
        padded[:n] = pixel_values
        cos, sin = vision_cos_sin(arr, s.head_dim, s.merge_size, s.max_patches, s.rope_theta, dtype=self.np_dtype)
        return {"pixel_values": padded, "attention_mask": vision_attention_mask(arr, s.max_patches),
                "cos": cos, "sin": sin}

    def run_graph(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        """One graph call; every output by name (all N / merge_unit rows, padding included)."""
        outs = self.session.run(list(self.spec.output_names), feeds)
        return dict(zip(self.spec.output_names, outs))

    def run(self, pixel_values: np.ndarray, grids: npt.ArrayLike) -> np.ndarray:
        """Real patches [n, patch_dim] → image embeddings [n / merge_unit, out_hidden] (export dtype)."""
        n = int(fit_grids(grids, self.spec.max_patches).prod(axis=1).sum())
        return self.embeddings(self.run_graph(self.feeds(pixel_values, grids)), n)

    def embeddings(self, outs: dict[str, np.ndarray], n_patches: int) -> np.ndarray:
        """The real rows of every chunk, concatenated: [n_patches / merge_unit, out_hidden]."""
        rows = n_patches // self.spec.merge_unit
        return np.concatenate([outs[name][:rows] for name in self.spec.output_names], axis=1)

    def encode_images(self, images: Sequence[ImageLike]) -> tuple[np.ndarray, np.ndarray]:
        """Images → (embeddings [tokens, out_hidden], image_grid_thw [k, 3]) with the artifact's preprocessing."""
        pixel_values, grids = images_to_patches(images, self.preprocess)
        return self.run(pixel_values, grids), grids
