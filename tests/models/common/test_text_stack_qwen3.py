"""The shared decoder deployment module generalised for Qwen3-VL's text model: q/k RMSNorm over each head before
rotary, no q/k/v biases, an explicit head_dim that is not hidden / heads, interleaved M-RoPE from the host, and
DeepStack rows added to the hidden states at the vision positions after layers 0..k-1 — against transformers
4.57.6's own Qwen3VLTextModel (eager, fp32) on the same inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from qvlc.artifact.spec import TokenIds
from qvlc.host.rope import get_rope_index, mrope_cos_sin
from qvlc.models.common.dims import TextDims
from qvlc.models.common.text import PrefillGraph, TextStack
from qvlc.models.common.tp import rank_layout

H, HEADS, KV, D, L, V, SECTION, THETA = 64, 4, 2, 32, 3, 256, [4, 6, 6], 5e6


@pytest.fixture(scope="module")
def model():
    from transformers.models.qwen3_vl.configuration_qwen3_vl import Qwen3VLTextConfig
    from transformers.models.qwen3_vl.modeling_qwen3_vl import Qwen3VLTextModel

    cfg = Qwen3VLTextConfig(hidden_size=H, intermediate_size=128, num_hidden_layers=L, num_attention_heads=HEADS,
                            num_key_value_heads=KV, head_dim=D, vocab_size=V, rope_theta=THETA,
                            rope_scaling={"rope_type": "default", "mrope_section": SECTION, "mrope_interleaved": True})
    cfg._attn_implementation = "eager"
    torch.manual_seed(3)
    m = Qwen3VLTextModel(cfg).eval()
    with torch.no_grad():
        for name, p in m.named_parameters():
            if "norm" in name:  # randomised norms: a dropped q/k norm shows
                p.copy_(1 + 0.3 * torch.randn_like(p))
            else:
                p.normal_(0, 0.08)
    return m


def _inputs(rng):
    tokens = TokenIds(bos=None, eos=9, vision_start=1, vision_end=2, image=3, video=4)
    ids = np.array([5, 6, 1] + [3] * 12 + [2, 7, 8, 9])
    pos, _ = get_rope_index(ids, tokens, 2, image_grid_thw=[[1, 6, 8]])
    embeds = rng.standard_normal((1, len(ids), H)).astype(np.float32)
    visual = ids == 3
    deep = rng.standard_normal((2, int(visual.sum()), H)).astype(np.float32) * 2
    return ids, pos, embeds, visual, deep


@pytest.mark.parametrize("with_deepstack", [True, False])
def test_qwen3_text_stack_matches_transformers(model, with_deepstack):
    rng = np.random.default_rng(0)
    ids, pos, embeds, visual, deep = _inputs(rng)
    S = len(ids)
    head = torch.nn.Linear(H, V, bias=False)
    torch.nn.init.normal_(head.weight, 0, 0.1)
    with torch.no_grad():
        ref = model(inputs_embeds=torch.from_numpy(embeds), position_ids=torch.from_numpy(pos)[:, None, :],
                    attention_mask=torch.ones(1, S, dtype=torch.long),
                    visual_pos_masks=torch.from_numpy(visual)[None] if with_deepstack else None,
                    deepstack_visual_embeds=[torch.from_numpy(d) for d in deep] if with_deepstack else None)
        want = head(ref.last_hidden_state[:, -1:]).numpy()
    text = TextDims(hidden=H, intermediate=128, layers=L, heads=HEADS, kv_heads=KV, head_dim=D, vocab=V,
                    rope_theta=THETA, mrope_section=tuple(SECTION), rms_eps=1e-6, tie_word_embeddings=False,
                    max_positions=4096, mrope_interleaved=True)
    stack = TextStack(model, head, text, rank_layout(text, 1, 0), torch.float32)
    cos, sin = mrope_cos_sin(pos, D, THETA, SECTION, interleaved=True)
    dense = np.zeros((2, 1, S, H), np.float32)
    dense[:, 0, visual] = deep
    with torch.no_grad():
        logits, kv = PrefillGraph(stack)(torch.from_numpy(embeds), torch.ones(1, S, dtype=torch.long),
                                         torch.from_numpy(cos), torch.from_numpy(sin),
                                         torch.from_numpy(dense if with_deepstack else np.zeros_like(dense)))
    assert np.abs(logits.numpy() - want).max() < 1e-4 * max(1.0, np.abs(want).max())
    if with_deepstack:  # the injection matters: without it the logits are elsewhere
        with torch.no_grad():
            plain, _ = PrefillGraph(stack)(torch.from_numpy(embeds), torch.ones(1, S, dtype=torch.long),
                                           torch.from_numpy(cos), torch.from_numpy(sin))
        assert np.abs(plain.numpy() - want).max() > 1e-2
