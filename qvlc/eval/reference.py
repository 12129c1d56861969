"""The reference side of ``qvlc eval --reference``: the manifest's checkpoint as transformers runs it — the whole
model in fp32, eager attention, greedy ``generate`` — fed the very ids and pixels the artifacts get (the host's
NumPy preprocessing, which tests show equals the processor's), so any difference is the graphs'."""

from __future__ import annotations

import numpy as np

from qvlc.errors import EnvironmentFailure
from qvlc.models.common.params import text_params, vision_params
from qvlc.runtime.prompt import VlmPrompt
from qvlc.runtime.vlm import VlmPipeline
from qvlc.system.memory import GB, available_bytes

HEADROOM = 1.3  # activations, generate's cache and the ONNX sessions beside the fp32 weights


class Reference:
    def __init__(self, pipe: VlmPipeline) -> None:
        from qvlc.checkpoint.hf_model import load_checkpoint

        need = (text_params(pipe.dims) + vision_params(pipe.dims)) * 4 * HEADROOM
        have, where = available_bytes()
        if need > have:
            raise EnvironmentFailure(
                f"--reference loads {pipe.checkpoint} in fp32: about {need / GB:.1f} GB, and {where} is "
                f"{have / GB:.1f} GB", key="--reference",
                fix="run without --reference (the artifacts alone), or on a machine with that much memory")
        self.pipe = pipe
        self.model = load_checkpoint(pipe.checkpoint).model

    def generate(self, prepared: VlmPrompt, max_new_tokens: int) -> tuple[list[int], str]:
        """Greedy tokens (the stop token included when generated, as the artifacts') and their text."""
        import torch

        pipe = self.pipe
        ids = torch.from_numpy(np.asarray(prepared.input_ids, dtype=np.int64))[None]
        kwargs = {}
        if len(prepared.grids("image")):
            kwargs["pixel_values"] = torch.from_numpy(prepared.pixels("image", pipe.visual_spec.patch_dim))
            kwargs["image_grid_thw"] = torch.from_numpy(prepared.grids("image"))
        with torch.no_grad():
            out = self.model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False,
                                      max_new_tokens=max_new_tokens, eos_token_id=sorted(pipe.stop_ids) or None,
                                      pad_token_id=pipe.tokenizer.pad_token_id or 0, **kwargs)
        tokens = out[0, ids.shape[1]:].tolist()
        return tokens, pipe.tokenizer.decode(tokens, skip_special_tokens=True)
