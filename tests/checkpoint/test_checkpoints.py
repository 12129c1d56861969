"""Random checkpoints (tiny default, streamed full-size writer) and lazy slice reading."""

from __future__ import annotations

import json

import torch

from qvlc.checkpoint.hf_model import load_checkpoint
from qvlc.checkpoint.lazy import lazy_text_model
from qvlc.checkpoint.load import weight_files
from qvlc.checkpoint.tiny import (
    shipped_config,
    tiny_checkpoint,
    write_random_checkpoint_streaming,
)


def test_tiny_default_is_randomised_gqa_with_two_layers():
    ck = load_checkpoint(tiny_checkpoint())
    t, v = ck.dims.text, ck.dims.vision
    assert t.kv_heads < t.heads and t.layers >= 2 and v.depth >= 2
    assert sum(t.mrope_section) * 2 == t.head_dim
    layer = ck.text_model.layers[0]
    assert layer.self_attn.q_proj.bias.abs().min() > 0  # biases are not left at 0
    assert not torch.allclose(layer.input_layernorm.weight, torch.ones_like(layer.input_layernorm.weight))
    assert not torch.allclose(ck.visual.blocks[0].norm1.bias, torch.zeros_like(ck.visual.blocks[0].norm1.bias))


def test_streamed_checkpoint_loads_completely_and_lazily(tmp_path):
    folder = write_random_checkpoint_streaming(shipped_config("tiny"), tmp_path / "ck", seed=1, shard_bytes=200_000)
    assert len(weight_files(folder)) > 1
    assert json.loads((folder / "config.json").read_text())["model_type"] == "qwen2_vl"
    from transformers import Qwen2VLForConditionalGeneration

    model, info = Qwen2VLForConditionalGeneration.from_pretrained(folder, dtype=torch.float32,
                                                                  output_loading_info=True)
    assert info["missing_keys"] == [] and info["unexpected_keys"] == []
    text, head = lazy_text_model(folder)
    q = model.model.language_model.layers[1].self_attn.q_proj.weight
    assert torch.equal(text.layers[1].self_attn.q_proj.weight.narrow(0, 16, 32).float(), q[16:48])
    assert torch.equal(head.weight.narrow(0, 0, 1024).float(), model.lm_head.weight)


def test_vision_tower_alone_equals_the_full_models_tower():
    from qvlc.checkpoint.hf_model import load_vision_tower

    folder = tiny_checkpoint()
    full, alone = load_checkpoint(folder), load_vision_tower(folder)
    assert alone.model is None
    grid = torch.tensor([[1, 4, 6]])
    x = torch.randn(24, 1176, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(full.visual(x, grid_thw=grid), alone.visual(x, grid_thw=grid))


def test_tiny_vision_attention_is_sharp_enough_to_expose_a_rotary_bug(monkeypatch):
    """Dropping the vision rotary must move the tower's output well past the fp16 tolerance (rel L2 3e-2)."""
    import transformers.models.qwen2_vl.modeling_qwen2_vl as hf

    vis = load_checkpoint(tiny_checkpoint()).visual
    grid = torch.tensor([[1, 8, 12]])
    x = torch.randn(96, 1176, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        ref = vis(x, grid_thw=grid)
        monkeypatch.setattr(hf, "apply_rotary_pos_emb_vision", lambda q, k, cos, sin: (q, k))
        bad = vis(x, grid_thw=grid)
    assert float((ref - bad).norm() / ref.norm()) > 3e-2


def test_a_checkpoint_of_the_tower_alone_compiles_its_visual_part_only(tmp_path):
    """A visual compile checks (and reads) only the vision tower's tensors; the LLM part of the same checkpoint is
    refused before loading, naming a missing text tensor."""
    import pytest

    from qvlc.compile.plan import checked_plan
    from qvlc.config.loading import config_from_dict
    from qvlc.errors import CheckpointError

    folder = write_random_checkpoint_streaming(shipped_config("tiny"), tmp_path / "tower", seed=1, vision_only=True)
    plan = checked_plan(config_from_dict({"name": "v", "part": "visual", "model": {"checkpoint": str(folder)}}))
    assert plan.cfg.part == "visual"
    with pytest.raises(CheckpointError) as info:
        checked_plan(config_from_dict({"name": "l", "part": "llm", "model": {"checkpoint": str(folder)}}))
    assert "no tensor 'model." in str(info.value)
