"""What a model family provides, and the parts every Qwen-VL family shares.

A family is one folder under ``qvlc/models/`` whose ``__init__`` defines ``FAMILY``, an instance of a ``Family``
subclass, and one line in the registry (``qvlc/models/__init__.py``). Generic code (pipeline, export, validation,
runtime, host) only ever talks to a ``Family``; it imports no family and never branches on a model name.

Importing a family has no side effects and does not import torch: deployment modules and transformers classes
are imported when a method needs them.
"""

from __future__ import annotations

import importlib
import json
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Sequence

import numpy as np

from qvlc.artifact.layout import VISUAL, rank_dirs
from qvlc.artifact.signature import GraphSig
from qvlc.artifact.spec import LlmSpec, TokenIds, VisualSpec
from qvlc.models.common.dims import ModelDims
from qvlc.models.common.islands import Islands
from qvlc.precision import KvCache, Precision

VISION_ROPE_THETA = 10000.0  # the rotary base of every Qwen-VL vision tower (not in config.json)

if TYPE_CHECKING:
    import torch

    from qvlc.models.common.tp import RankLayout, TpPlan


@dataclass(frozen=True)
class VisionFeeds:
    """The visual graph's inputs for some grids, and how to put its output rows back in prompt order."""

    feeds: dict[str, np.ndarray]
    tokens: int  # real merged rows at the top of every output
    order: np.ndarray | None = None  # output row i of the prompt is graph row order[i] (None: same order)


class Family:
    """The model family interface. Subclasses set the class attributes and implement the abstract methods."""

    model_type: str = ""  # config.json model_type, the registry key
    display_name: str = ""
    package: str = ""  # the family's module, for its shipped configs
    # transformers classes by role: "config", "model" (the *ForConditionalGeneration), "vision" (the tower alone)
    hf_classes: dict[str, str] = {}
    # token strings that end a chat turn besides the config's eos (Instruct generation configs list both)
    stop_tokens: tuple[str, ...] = ("<|im_end|>", "<|endoftext|>")
    vision_wrap_tokens = 2  # tokens around each image span in a prompt: vision_start + vision_end
    frames_as_grids = False  # Qwen3-VL: each temporal patch of a video is a vision span (and M-RoPE grid) of its own
    tiny_seed = 20241125
    tiny_std: float | None = None  # std of the tiny default's weights (None: transformers' init)
    # the video processor's rules, written into preprocess.json (qvlc.host.preprocess.PreprocessConfig)
    video_rules: dict[str, str] = {"video_sampling": "ramp", "video_budget": "frame"}

    # -- config.json ----------------------------------------------------------------------------------------
    def dims(self, config: dict[str, Any], source: str = "config.json") -> ModelDims:
        """Every number the graphs need, checked; CheckpointError naming the field when one is missing or wrong."""
        raise NotImplementedError

    def shipped_config(self, name: str) -> dict[str, Any]:
        """A config.json shipped in the family's ``configs/`` folder ('tiny', or a full-size model's)."""
        return json.loads(resources.files(self.package).joinpath(f"configs/{name}.json").read_text())

    def hf_class(self, role: str) -> Any:
        module, _, name = self.hf_classes[role].rpartition(".")
        return getattr(importlib.import_module(module), name)

    # -- deployment modules ---------------------------------------------------------------------------------
    @property
    def tp_plan(self) -> "TpPlan":
        from qvlc.models.common.text import QWEN2_TP_PLAN

        return QWEN2_TP_PLAN

    def llm_graph(self, file: str, text_model: Any, lm_head: Any, dims: ModelDims, layout: "RankLayout",
                  dtype: "torch.dtype", stack: Any = None, islands: Islands = Islands(),
                  kv_cache: KvCache = KvCache.FP) -> tuple["torch.nn.Module", Any]:
        """The deployment module of LLM graph ``file`` (prefill, decode or chunk) for one rank; ``stack`` reuses the
        layers built for the other graph; ``islands``: modules computed in fp32; ``kv_cache``: how the cache is
        stored (``export.kv_cache``). Returns (module, stack)."""
        from qvlc.models.common.text import GRAPH_MODULES, TextStack

        stack = stack or TextStack(text_model, lm_head, dims.text, layout, dtype, islands, kv_cache)
        return GRAPH_MODULES[file](stack), stack

    def visual_graph(self, hf_visual: Any, dims: ModelDims, chunk_width: int, dtype: "torch.dtype",
                     attention_block: int = 0, islands: Islands = Islands()) -> Any:
        """The visual deployment module; ``attention_block`` > 0: attention computed that many query rows at a
        time (``export.attention_block``); ``islands``: modules computed in fp32."""
        raise NotImplementedError

    # -- graph signatures -----------------------------------------------------------------------------------
    def llm_signatures(self, spec: LlmSpec) -> dict[str, GraphSig]:
        from qvlc.models.common.text import llm_signatures

        return llm_signatures(spec)

    def visual_signature(self, spec: VisualSpec) -> GraphSig:
        raise NotImplementedError

    # -- what the manifest records ----------------------------------------------------------------------------
    def llm_spec(self, dims: ModelDims, prefill_len: int, max_context: int, tp: int, dtype: Precision,
                 prefill_chunk: int = 0, kv_cache: KvCache = KvCache.FP) -> LlmSpec:
        from qvlc.models.common.tp import rank_layout

        t, k = dims.text, dims.tokens
        return LlmSpec(prefill_len=prefill_len, max_context=max_context, tp=tp, dtype=Precision(dtype),
                       hidden=t.hidden, layers=t.layers, head_dim=t.head_dim,
                       kv_heads_per_rank=rank_layout(t, tp, 0).kv_heads, vocab=t.vocab, rope_theta=t.rope_theta,
                       mrope_section=tuple(t.mrope_section), eos=k.eos, image_token=k.image, video_token=k.video,
                       vision_start=k.vision_start, vision_end=k.vision_end, stop_tokens=self.stop_tokens,
                       deepstack_layers=len(dims.vision.deepstack), mrope_interleaved=t.mrope_interleaved,
                       prefill_chunk=prefill_chunk, kv_cache=KvCache(kv_cache))

    def visual_spec(self, dims: ModelDims, max_patches: int, chunk_width: int, dtype: Precision) -> VisualSpec:
        v = dims.vision
        return VisualSpec(max_patches=max_patches, patch_dim=v.patch_dim, head_dim=v.head_dim,
                          merge_size=v.merge_size, out_hidden=v.out_hidden,
                          chunk_widths=tuple(chunk_widths(v.out_hidden, chunk_width)), dtype=Precision(dtype),
                          rope_theta=VISION_ROPE_THETA, window=v.window,
                          fullatt_blocks=tuple(v.fullatt_blocks) if v.window else (), deepstack=len(v.deepstack),
                          pos_table_side=v.pos_table_side)

    def declared_graphs(self, folder: Path, llm: LlmSpec | None = None,
                        visual: VisualSpec | None = None) -> list[tuple[str, Path, GraphSig]]:
        """(label, file, declared signature) of every graph an artifact with this spec holds: the one list both
        validation and the trust check (``qvlc.models.artifact_family``) check the files against."""
        if llm is not None:
            ranked = llm.tp > 1
            return [(name.removesuffix(".onnx").removeprefix("llm_") + (f"[rank{r}]" if ranked else ""), d / name,
                     sig) for r, d in enumerate(rank_dirs(folder, llm.tp))
                    for name, sig in self.llm_signatures(llm).items()]
        return [("visual", Path(folder) / VISUAL, self.visual_signature(visual))] if visual is not None else []

    # -- host side --------------------------------------------------------------------------------------------
    def rope_index(self, input_ids: np.ndarray, tokens: TokenIds, merge_size: int, tokens_per_second: int = 0,
                   image_grid_thw: Any = None, video_grid_thw: Any = None,
                   second_per_grid_ts: Sequence[float] | None = None,
                   attention_mask: Any = None) -> tuple[np.ndarray, int]:
        """M-RoPE positions [3, S] and rope delta, exactly as the family's transformers ``get_rope_index``."""
        from qvlc.host.rope import get_rope_index

        grids = None if video_grid_thw is None else np.asarray(video_grid_thw).reshape(-1, 3)
        steps = None if grids is None else self.video_time_steps(len(grids), tokens_per_second, second_per_grid_ts)
        return get_rope_index(input_ids, tokens, merge_size, image_grid_thw, video_grid_thw, attention_mask,
                              video_time_steps=steps)

    def video_time_steps(self, videos: int, tokens_per_second: int,
                         second_per_grid_ts: Sequence[float] | None) -> list[int]:
        """M-RoPE time positions between consecutive temporal patches of each video (Qwen2-VL: 1)."""
        return [1] * videos

    def oracle_video_kwargs(self, second_per_grid_ts: Sequence[float] | None) -> dict[str, Any]:
        """Extra keyword arguments transformers' model takes with a video (Qwen2.5-VL: second_per_grid_ts)."""
        return {}

    def vision_feeds(self, spec: VisualSpec, pixel_values: np.ndarray, grids: np.ndarray) -> VisionFeeds:
        raise NotImplementedError

    def tower_rows(self, out: Any) -> np.ndarray:
        """transformers' vision tower output as one array [rows, out_hidden * (1 + DeepStack layers)]: the
        embedding, then each DeepStack embedding (Qwen3-VL's tower returns them as a tuple)."""
        import torch

        if isinstance(out, (tuple, list)):
            return torch.cat([out[0], *out[1]], dim=-1).numpy()
        return out.numpy()


def chunk_widths(out_hidden: int, chunk_width: int) -> list[int]:
    """Widths of the ``image_embeds_i`` outputs: full chunks, then the remainder (1536/640 → [640, 640, 256])."""
    full, rest = divmod(out_hidden, chunk_width)
    return [chunk_width] * full + ([rest] if rest else [])
