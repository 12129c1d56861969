"""transformers' own classes for a checkpoint: the unmodified model (or its vision tower) loaded in fp32 as the
oracle and the owner of every weight exported from views, and the meta-device shell (no weights) whose classes
the streamed oracle and the GPTQ calibration run layer by layer."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from qvlc.checkpoint.inspect import inspect_checkpoint
from qvlc.checkpoint.load import VISUAL_PREFIXES, weight_files
from qvlc.errors import CheckpointError

if TYPE_CHECKING:
    import torch

    from qvlc.models.common.dims import ModelDims
    from qvlc.models.common.family import Family


@dataclass
class LoadedCheckpoint:
    """The oracle: transformers' own model (or only its vision tower) in fp32, eager attention."""

    folder: Path
    dims: "ModelDims"
    model: "torch.nn.Module | None"  # the *ForConditionalGeneration model (None: tower only)
    vision_tower: "torch.nn.Module | None" = None

    @property
    def text_model(self) -> "torch.nn.Module":
        return self.model.model.language_model

    @property
    def visual(self) -> "torch.nn.Module":
        return self.vision_tower if self.vision_tower is not None else self.model.model.visual

    @property
    def lm_head(self) -> "torch.nn.Linear":
        return self.model.lm_head


def _resolve(folder: Path, family: "Family | None", dims: "ModelDims | None") -> tuple["Family", "ModelDims"]:
    if family is None or dims is None:
        return inspect_checkpoint(folder)
    return family, dims


def load_checkpoint(folder: Path, family: "Family | None" = None, dims: "ModelDims | None" = None) -> LoadedCheckpoint:
    """The unmodified transformers model in fp32: the oracle, and the owner of every weight exported from views.
    The family and dims come from the folder's config.json unless given."""
    import torch

    family, dims = _resolve(folder, family, dims)
    model = family.hf_class("model").from_pretrained(folder, dtype=torch.float32, attn_implementation="eager",
                                                     trust_remote_code=False, local_files_only=True)
    model.eval().requires_grad_(False)
    return LoadedCheckpoint(folder=Path(folder), dims=dims, model=model)


def load_vision_tower(folder: Path, family: "Family | None" = None, dims: "ModelDims | None" = None,
                      dtype: "torch.dtype | None" = None) -> LoadedCheckpoint:
    """Only transformers' vision tower (eager) with the checkpoint's weights: what the visual part needs, without
    the language model. fp32 by default (the in-memory oracle); the visual export asks for its own dtype, so the
    deployment module's weights are views of the tower's (2B in fp16: 1.35 GB instead of 2.7 GB). Each tensor is
    copied into the tower as it is read, never a second whole copy beside it."""
    import torch
    from safetensors import safe_open

    family, dims = _resolve(folder, family, dims)
    vcfg = family.hf_class("config").from_pretrained(folder, trust_remote_code=False,
                                                     local_files_only=True).vision_config
    vcfg._attn_implementation = "eager"
    tower = family.hf_class("vision")._from_config(vcfg, dtype=dtype or torch.float32)
    targets, unexpected = tower.state_dict(), []
    for file in weight_files(folder):
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                prefix = next((p for p in VISUAL_PREFIXES if key.startswith(p)), None)
                if prefix is None:
                    continue
                target = targets.pop(key[len(prefix):], None)
                if target is None or tuple(target.shape) != tuple(f.get_slice(key).get_shape()):
                    unexpected.append(key)
                else:
                    with torch.no_grad():
                        target.copy_(f.get_tensor(key))
    missing = list(targets)  # state_dict holds no rotary inv_freq: transformers registers it non-persistent
    if missing or unexpected:
        raise CheckpointError(f"{folder}: vision weights do not match the config (missing {missing[:3]}, "
                              f"unexpected or mis-shaped {unexpected[:3]})", fix="use the checkpoint's own config.json",
                              key="model.checkpoint")
    tower.eval().requires_grad_(False)
    return LoadedCheckpoint(folder=Path(folder), dims=dims, model=None, vision_tower=tower)


def causal(t: int) -> "torch.Tensor":
    """transformers' eager causal mask: 0 where a query may attend, the fp32 minimum elsewhere."""
    import torch

    return torch.full((t, t), torch.finfo(torch.float32).min).triu(1)[None, None]


class Shell:
    """transformers' classes for a checkpoint, instantiated on the meta device (no weights, no memory): the
    source of the decoder-layer class, ``get_rope_index`` and the rotary embedding."""

    def __init__(self, family: "Family", folder: Path) -> None:
        import torch

        config = family.hf_class("config").from_pretrained(folder, trust_remote_code=False)
        config._attn_implementation = "eager"
        config.text_config._attn_implementation = "eager"
        with torch.device("meta"):
            self.model = family.hf_class("model")(config)
        self.text_config = config.text_config
        self.family = family
        lm = self.model.model.language_model
        self.rotary = type(lm.rotary_emb)(config=self.text_config)  # on the CPU: its inv_freq is computed here
        self.layer_cls, self.norm_cls = type(lm.layers[0]), type(lm.norm)
