"""The visual oracle, streamed: transformers' own vision tower (its ``forward``, unmodified) over every case at
once, with each block's weights read from the checkpoint files when that block runs and released after.

All cases go through one ``forward`` on their concatenated patches and grids: the tower attends per frame (and
per window), so cases never mix, and each block runs once — layer-major, each block's weights read once. The
parts around the blocks (patch embedding, merger: a few MB) are loaded whole; the rotary table is computed.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from qvlc.checkpoint.lazy import Tree, fill, lazy_vision_tower, materialize
from qvlc.models.common.dims import ModelDims
from qvlc.models.common.family import Family
from qvlc.models.common.quantized import quantized_vision
from qvlc.validate.ranges import RangeRecorder, Segments, remove
from qvlc.weights.quant import WeightQuant

VISUAL = "model.visual"  # transformers' module names, as the range report gives them


def hook_tower(tower: nn.Module, ranges: RangeRecorder, segments: Segments, merge_unit: int,
               blocks: bool = True) -> list:
    """Range hooks on a vision tower: the patch embedding (the residual stream's start), the merger's and the
    DeepStack mergers' linears (on merged rows) and, with ``blocks``, every block (a streamed tower hooks its blocks as they are built)."""
    merged = [(c, a // merge_unit, b // merge_unit) for c, a, b in segments]
    handles = ranges.hook(tower.patch_embed, f"{VISUAL}.patch_embed", segments, packed=True)
    handles += ranges.hook(tower.merger, f"{VISUAL}.merger", merged, packed=True, residual=False)
    for j, merger in enumerate(getattr(tower, "deepstack_merger_list", ())):  # Qwen3-VL
        handles += ranges.hook(merger, f"{VISUAL}.deepstack_merger_list.{j}", merged, packed=True, residual=False)
    if blocks:
        for i, block in enumerate(tower.blocks):
            handles += ranges.hook(block, f"{VISUAL}.blocks.{i}", segments, packed=True)
    return handles


class _StreamedBlock(nn.Module):
    """Stands in for block ``i``: builds it (meta → CPU), reads its weights, runs it, lets it go."""

    def __init__(self, cls, config, tree: Tree, index: int) -> None:
        super().__init__()
        self.cls, self.config, self.tree, self.index = cls, config, tree, index
        self.loads = 0
        self.ranges: tuple[RangeRecorder, Segments] = (RangeRecorder(enabled=False), [])  # set by each run

    def forward(self, *args, **kwargs):
        block = materialize(self.cls, self.config, tree=self.tree)
        self.loads += 1
        recorder, segments = self.ranges
        handles = recorder.hook(block, f"{VISUAL}.blocks.{self.index}", segments, packed=True)
        out = block(*args, **kwargs)
        remove(handles)
        del block
        return out


class StreamedVisionOracle:
    def __init__(self, family: Family, folder: Path, dims: ModelDims, quant: WeightQuant | None = None) -> None:
        """``quant``: read the tower's Linear weights dequantized from their integers (``include: [visual]``)."""
        config = family.hf_class("config").from_pretrained(folder, trust_remote_code=False).vision_config
        config._attn_implementation = "eager"
        with torch.device("meta"):
            tower = family.hf_class("vision")._from_config(config, dtype=torch.float32)
        tree = lazy_vision_tower(folder)
        if quant is not None:
            quantized_vision(tree, quant)
        block_cls = type(tower.blocks[0])
        tower.blocks = nn.ModuleList()  # no block is ever materialised here
        tower = fill(tower.to_empty(device="cpu").eval(), tree)
        tower.rotary_pos_emb = type(tower.rotary_pos_emb)(dims.vision.head_dim // 2)  # its inv_freq, computed
        tower.blocks = nn.ModuleList(_StreamedBlock(block_cls, config, tree.blocks[i], i)
                                    for i in range(dims.vision.depth))
        self.tower, self.merge_unit, self.family = tower, dims.vision.merge_unit, family

    @torch.no_grad()
    def run(self, cases: list[tuple[np.ndarray, np.ndarray]], names: list[str] | None = None,
            ranges: RangeRecorder | None = None) -> list[np.ndarray]:
        """(pixel_values [n, patch_dim], grids [k, 3]) per case → its embeddings [n / merge_unit, out_hidden].
        With ``ranges``, each block's magnitudes are recorded per case (``names``)."""
        pixels = torch.from_numpy(np.concatenate([p for p, _ in cases]))
        grids = torch.from_numpy(np.concatenate([g for _, g in cases]).astype(np.int64))
        ends = np.cumsum([len(p) for p, _ in cases])
        segments = [(n, int(b - len(p)), int(b)) for n, (p, _), b in zip(names or [""] * len(cases), cases, ends)]
        ranges = ranges or RangeRecorder(attn_name="attn", enabled=False)
        handles = hook_tower(self.tower, ranges, segments, self.merge_unit, blocks=False)
        for block in self.tower.blocks:
            block.ranges = (ranges, segments)
        try:
            with ranges.recording():
                out = self.family.tower_rows(self.tower(pixels, grid_thw=grids))
        finally:
            remove(handles)
        sizes = [len(p) // self.merge_unit for p, _ in cases]
        return np.split(out, np.cumsum(sizes)[:-1])
