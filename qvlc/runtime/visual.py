"""ONNX Runtime for the visual artifact: patches (or images, or videos) → merged vision embeddings, used by
`qvlc run` and by validation.

The host side does what the static graph cannot: the family builds the inputs for the grids (padding to N,
vision cos/sin, masks — and for window attention, the window order), then the real rows of the
``image_embeds_i`` column chunks are concatenated and put back in prompt order.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import numpy.typing as npt

from qvlc.artifact.layout import VISUAL
from qvlc.artifact.spec import VisualSpec
from qvlc.host.preprocess import ImageLike, PreprocessConfig, images_to_patches
from qvlc.host.vision import fit_grids
from qvlc.models.common.family import Family, VisionFeeds
from qvlc.precision import Runtime
from qvlc.runtime.artifact import open_artifact, read_preprocess
from qvlc.runtime.sessions import open_session


class VisualRuntime:
    """visual.onnx in ONNX Runtime (or TVM: ``runtime``), with the family's host-side inputs."""

    def __init__(self, folder: Path, spec: VisualSpec | None = None, family: Family | None = None,
                 preprocess: PreprocessConfig | None = None, runtime: Runtime = Runtime.ONNXRUNTIME) -> None:
        """``spec``/``family`` default to the artifact's, opened and checked, and ``preprocess`` to its
        preprocess.json (``qvlc.runtime.artifact``)."""
        self.folder = Path(folder)
        if spec is None or family is None:
            m, family = open_artifact(self.folder, "visual", str(folder))
            spec = spec or m.visual
        self.spec, self.family = spec, family
        self.preprocess = preprocess or read_preprocess(self.folder, str(folder))
        self.session = open_session(self.folder / VISUAL, runtime=runtime)

    def feeds(self, pixel_values: np.ndarray, grids: npt.ArrayLike) -> VisionFeeds:
        """The graph inputs for real patches ``pixel_values`` [n, patch_dim] with ``grids`` (t, h, w) rows.

        Raises QvlcError when the patches exceed N or do not match the grids.
        """
        return self.feeds_for(self.spec, self.family, pixel_values, grids)

    @staticmethod
    def feeds_for(spec: VisualSpec, family: Family, pixel_values: np.ndarray, grids: npt.ArrayLike) -> VisionFeeds:
        """``feeds`` without a session."""
        return family.vision_feeds(spec, np.asarray(pixel_values), fit_grids(grids, spec.max_patches))

    def run_graph(self, feeds: VisionFeeds) -> dict[str, np.ndarray]:
        """One graph call; every output by name (all N / merge_unit rows, padding included, in graph order)."""
        outs = self.session.run(list(self.spec.output_names), feeds.feeds)
        return dict(zip(self.spec.output_names, outs))

    def embeddings(self, feeds: VisionFeeds, outs: dict[str, np.ndarray], rows: slice | None = None) -> np.ndarray:
        """The real rows of every chunk, concatenated and in prompt order: [tokens, out_hidden]; ``rows`` picks a
        range of them (prompt order)."""
        got = np.concatenate([outs[name][:feeds.tokens] for name in self.spec.output_names], axis=1)
        if feeds.order is not None:
            got = got[feeds.order]
        return got if rows is None else got[rows]

    def run(self, pixel_values: np.ndarray, grids: npt.ArrayLike) -> np.ndarray:
        """Real patches [n, patch_dim] → vision embeddings [n / merge_unit, out_hidden] (export dtype)."""
        feeds = self.feeds(pixel_values, grids)
        return self.embeddings(feeds, self.run_graph(feeds))

    def encode_images(self, images: Sequence[ImageLike]) -> tuple[np.ndarray, np.ndarray]:
        """Images → (embeddings [tokens, out_hidden], image_grid_thw [k, 3]) with the artifact's preprocessing."""
        pixel_values, grids = images_to_patches(images, self.preprocess)
        return self.run(pixel_values, grids), grids
