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

from qvlc.models.common.dims import ModelDims
from qvlc.models.common.family import Family
from qvlc.models.common.lazy import Tree, lazy_vision_tower


def _read(tree, name: str) -> torch.Tensor:
    node = tree
    for part in name.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node.narrow(0, 0, node.shape[0]).float()


def _fill(module: nn.Module, tree, skip: str | None = None) -> nn.Module:
    with torch.no_grad():
        for name, p in module.named_parameters():
            if skip is None or not name.startswith(skip):
                p.copy_(_read(tree, name))
    return module


class _StreamedBlock(nn.Module):
    """Stands in for block ``i``: builds it (meta → CPU), reads its weights, runs it, lets it go."""

    def __init__(self, cls, config, tree: Tree) -> None:
        super().__init__()
        self.cls, self.config, self.tree = cls, config, tree
        self.loads = 0

    def forward(self, *args, **kwargs):
        with torch.device("meta"):
            block = self.cls(self.config)
        block = _fill(block.to_empty(device="cpu").eval(), self.tree)
        self.loads += 1
        out = block(*args, **kwargs)
        del block
        return out


class StreamedVisionOracle:
    def __init__(self, family: Family, folder: Path, dims: ModelDims) -> None:
        config = family.hf_class("config").from_pretrained(folder).vision_config
        config._attn_implementation = "eager"
        with torch.device("meta"):
            tower = family.hf_class("vision")._from_config(config, dtype=torch.float32)
        tree = lazy_vision_tower(folder)
        block_cls = type(tower.blocks[0])
        tower.blocks = nn.ModuleList()  # no block is ever materialised here
        tower = _fill(tower.to_empty(device="cpu").eval(), tree)
        tower.rotary_pos_emb = type(tower.rotary_pos_emb)(dims.vision.head_dim // 2)  # its inv_freq, computed
        tower.blocks = nn.ModuleList(_StreamedBlock(block_cls, config, tree.blocks[i]) for i in range(dims.vision.depth))
        self.tower, self.merge_unit = tower, dims.vision.merge_unit

    @torch.no_grad()
    def run(self, cases: list[tuple[np.ndarray, np.ndarray]]) -> list[np.ndarray]:
        """(pixel_values [n, patch_dim], grids [k, 3]) per case → its embeddings [n / merge_unit, out_hidden]."""
        pixels = torch.from_numpy(np.concatenate([p for p, _ in cases]))
        grids = torch.from_numpy(np.concatenate([g for _, g in cases]).astype(np.int64))
        out = self.tower(pixels, grid_thw=grids).numpy()
        sizes = [len(p) // self.merge_unit for p, _ in cases]
        return np.split(out, np.cumsum(sizes)[:-1])
