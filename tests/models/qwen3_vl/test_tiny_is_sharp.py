"""The tiny Qwen3-VL default is sharp enough that each of its three new mechanisms changes the greedy tokens of an
image prompt in transformers itself: DeepStack, interleaved M-RoPE and the learned position table. A graph that
dropped any of them would therefore fail the compile's greedy check, not only drift within tolerance."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qvlc.checkpoint.hf_model import load_checkpoint
from qvlc.checkpoint.tiny import tiny_checkpoint
from qvlc.models import family

NEW = 16


@pytest.fixture(scope="module")
def setup():
    fam = family("qwen3_vl")
    ck = load_checkpoint(tiny_checkpoint(family=fam))
    d = ck.dims
    grid = np.array([[1, 8, 12]])
    rng = np.random.default_rng(1)
    pixels = torch.from_numpy(rng.uniform(-1, 1, (int(grid.prod()), d.vision.patch_dim)).astype(np.float32))
    n = int(grid.prod()) // d.vision.merge_unit
    ids = [5, 6, d.tokens.vision_start] + [d.tokens.image] * n + [d.tokens.vision_end, 7, 8, 9]
    return ck.model, torch.tensor([ids]), pixels, torch.from_numpy(grid)


def greedy(model, ids, pixels, grid) -> list[int]:
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), pixel_values=pixels,
                             image_grid_thw=grid, max_new_tokens=NEW, min_new_tokens=NEW, do_sample=False,
                             eos_token_id=None, pad_token_id=0)
    return out[0, ids.shape[1]:].tolist()


def chunked(self, freqs, mrope_section):
    """Qwen2-VL's chunked sections instead of Qwen3-VL's interleaving (the half-width frequencies)."""
    bounds = np.cumsum([0, *mrope_section])
    return torch.cat([freqs[i % 3, ..., bounds[i]:bounds[i + 1]] for i in range(3)], dim=-1)


@pytest.mark.parametrize("without", ["deepstack", "interleaving", "position_table"])
def test_each_mechanism_changes_the_greedy_tokens(setup, monkeypatch, without):
    model, ids, pixels, grid = setup
    base = greedy(model, ids, pixels, grid)
    lm, visual = model.model.language_model, model.model.visual
    if without == "deepstack":
        monkeypatch.setattr(type(lm), "_deepstack_process", lambda self, h, mask, embeds: h)
    elif without == "interleaving":
        monkeypatch.setattr(type(lm.rotary_emb), "apply_interleaved_mrope", chunked)
    else:
        saved = visual.pos_embed.weight.detach().clone()
        monkeypatch.setattr(visual.pos_embed.weight, "data", torch.zeros_like(saved))
    assert greedy(model, ids, pixels, grid) != base
