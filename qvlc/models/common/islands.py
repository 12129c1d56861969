"""fp32 islands: modules an fp16 graph computes in fp32 (``export.fp32_layers``), named as transformers names them.

Real Qwen2-VL-family weights push some activations past fp16's 65504 (the MLP of Qwen2.5-VL-3B's last vision
block; transformers issue 33294 for the decoder). The fix NVIDIA's edge exporter ships, and qvlc's: compute
those modules in fp32 (their weights stored in fp32, casts at their boundaries) and carry the residual stream
in fp32 from the first such layer on — an island's large output must not be added into an fp16 residual — up to
and including the module that reads its end (``lm_head``, the vision ``merger``): after the final norm divides
by a massive activation, the rest of the row is ~1e-5, subnormal in fp16 (measured on planted outliers: 38% of
the Qwen2.5-VL merger's input).

Units are the attention and the MLP of each decoder layer or vision block, plus ``lm_head``, the vision
``patch_embed``, ``merger`` and (Qwen3-VL) each DeepStack merger, ``deepstack_merger_list.{j}``; when the
residual stream is carried in fp32, the modules reading it (the merger, every DeepStack merger) are too. A pattern (fnmatch) selects the units it names, the units inside a module it
names (``model.language_model.layers.27`` → its ``self_attn`` and ``mlp``), and the unit holding a module it
names (``….mlp.down_proj`` → ``….mlp``), so the range report's module names can be given as they are.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatch
from typing import TYPE_CHECKING

from qvlc.artifact.layout import Part

if TYPE_CHECKING:
    from qvlc.models.common.dims import ModelDims

TEXT_LAYERS = "model.language_model.layers"
VISION = "model.visual"
DEEPSTACK = "deepstack_merger_list"  # Qwen3-VL: a merger on the residual stream after some blocks


@dataclass(frozen=True)
class Islands:
    units: tuple[str, ...] = ()  # the selected units, in graph order
    residual_from: int | None = None  # the first layer (or block) whose residual stream is carried in fp32

    def fp32(self, unit: str) -> bool:
        return unit in self.units

    def residual_fp32(self, index: int) -> bool:
        return self.residual_from is not None and index >= self.residual_from

    def __bool__(self) -> bool:
        return bool(self.units) or self.residual_from is not None


def text_units(layers: int) -> list[str]:
    return [f"{TEXT_LAYERS}.{i}.{m}" for i in range(layers) for m in ("self_attn", "mlp")] + ["lm_head"]


def vision_units(depth: int, deepstack: int = 0) -> list[str]:
    """patch_embed, each block's attn and mlp, the ``deepstack`` DeepStack mergers (Qwen3-VL), the merger."""
    return ([f"{VISION}.patch_embed"] + [f"{VISION}.blocks.{i}.{m}" for i in range(depth) for m in ("attn", "mlp")]
            + [f"{VISION}.{DEEPSTACK}.{j}" for j in range(deepstack)] + [f"{VISION}.merger"])


def part_units(part: str, dims: "ModelDims") -> list[str]:
    """The modules of a part ("llm" or "visual") an fp32 island can hold."""
    if part == Part.LLM:
        return text_units(dims.text.layers)
    return vision_units(dims.vision.depth, len(dims.vision.deepstack))


def selects(pattern: str, unit: str) -> bool:
    """``pattern`` names the unit, a module around it, or a module inside it."""
    parts, names = pattern.split("."), unit.split(".")
    inside = len(parts) > len(names) and all(fnmatch(n, p) for n, p in zip(names, parts))  # component-wise
    return fnmatch(unit, pattern) or fnmatch(unit, f"{pattern}.*") or inside


def _index(unit: str) -> int | None:
    """The layer / block index of a unit (patch_embed: 0, before every block; lm_head, merger: none)."""
    parts = unit.split(".")
    for key in ("layers", "blocks"):
        if key in parts:
            return int(parts[parts.index(key) + 1])
    return 0 if unit.endswith("patch_embed") else None


def islands(patterns: list[str] | tuple[str, ...], units: list[str], residual_modules: tuple[str, ...] = ()) -> Islands:
    """The Islands ``patterns`` select among ``units``; ``residual_modules`` (a layer or block whose residual
    stream the range check flagged) start the fp32 residual there too."""
    chosen = [u for u in units if any(selects(p, u) for p in patterns)]
    starts = [i for i in (_index(u) for u in chosen) if i is not None]
    starts += [i for i in (_index(m) for m in residual_modules) if i is not None]
    head = units[-1]  # lm_head or the merger: it reads the residual stream's end
    if starts:  # an fp32 residual cast to fp16 for a module reading it would lose its small values
        readers = [u for u in units if u == head or f".{DEEPSTACK}." in u]  # DeepStack mergers read it midway
        chosen = [u for u in units if u in chosen or u in readers]
    return Islands(tuple(chosen), min(starts) if starts else None)


def unmatched(patterns: list[str] | tuple[str, ...], units: list[str]) -> list[str]:
    """Patterns that select no unit (a typo, or the other part's modules)."""
    return [p for p in patterns if not any(selects(p, u) for u in units)]
