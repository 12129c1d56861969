"""What a compile (and its validation) will need in memory, estimated from the dims and shapes before any weight
is read, against what this machine (or its memory cgroup) allows.

The coefficients come from measured peaks on this kind of machine (README "Measured"): the fp32 transformers
oracle holds every parameter in 4 bytes; an ONNX Runtime CPU session of an fp16 graph ~4.5 bytes per parameter
(it casts the weights to fp32); x1.35 on those covers the rest (Python, torch and ORT arenas, KV snapshots);
attention scores are fp32 [heads, T, T] a few times over. Checked against measured peaks: 2B LLM at S = 2048
estimated 23.7 GB (measured 23.06 GB), at S = 512 22.6 GB (17.9 GB); 2B and Qwen2.5-VL-7B visual at N = 5120
14.5 GB (12.3 GB); Qwen2-VL-7B LLM tp = 4 without validation 6.2 GB (4.4 GB). It errs high, never low.
``QVLC_MEMORY_LIMIT_GB`` replaces the detected limit (a bigger swap-backed machine, or tests).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from qvlc.errors import ConfigError

if TYPE_CHECKING:
    from qvlc.config import Config
    from qvlc.models.common.dims import ModelDims

GB = 1e9
OVERHEAD = 1.35
ORT_BYTES_PER_PARAM = 4.5


@dataclass(frozen=True)
class Estimate:
    bytes: float
    parts: dict[str, float]

    def describe(self) -> str:
        return ", ".join(f"{k} {v / GB:.1f} GB" for k, v in self.parts.items())


def text_params(dims: "ModelDims") -> int:
    t = dims.text
    per_layer = (t.hidden * t.heads * t.head_dim * 2 + t.hidden * t.kv_heads * t.head_dim * 2
                 + 3 * t.hidden * t.intermediate)
    return t.layers * per_layer + t.vocab * t.hidden  # + lm_head (the graphs hold it; embed_tokens is a .bin)


def vision_params(dims: "ModelDims") -> int:
    v = dims.vision
    mlp = (3 if v.window else 2) * v.embed_dim * v.mlp_hidden
    merged = v.embed_dim * v.merge_unit
    return v.depth * (4 * v.embed_dim**2 + mlp) + merged * merged + merged * v.out_hidden + v.patch_dim * v.embed_dim


def estimate(cfg: "Config", dims: "ModelDims") -> Estimate:
    """Peak bytes of the compile: export alone, or export then validation when it is enabled."""
    e, dt = cfg.export, cfg.export.dtype.bytes
    parts: dict[str, float] = {}
    if cfg.part == "llm":
        graph = text_params(dims)
        if cfg.validate.enabled:
            s, t = e.prefill_len, dims.text
            parts["fp32 oracle"] = (graph + dims.text.vocab * dims.text.hidden + vision_params(dims)) * 4
            parts["ONNX Runtime session"] = graph * ORT_BYTES_PER_PARAM
            parts["attention"] = t.heads * s * s * 4 * 3 * 2  # graph and oracle, fp32 scores
        else:
            parts["one rank's weights"] = graph / e.tp * dt * 1.3
    else:
        n, v = e.max_patches, dims.vision
        parts["fp32 vision tower"] = vision_params(dims) * 10 if not cfg.validate.enabled else vision_params(dims) * 4
        if cfg.validate.enabled:
            parts["ONNX Runtime session"] = vision_params(dims) * ORT_BYTES_PER_PARAM
            parts["attention"] = v.heads * n * n * 4 * 4 + 2 * n * n
    total = sum(v for k, v in parts.items() if k != "attention") * OVERHEAD + parts.get("attention", 0.0)
    return Estimate(total, parts)


def available_bytes() -> tuple[float, str]:
    """(bytes, where the figure comes from): QVLC_MEMORY_LIMIT_GB, else the memory cgroup's limit, else RAM."""
    override = os.environ.get("QVLC_MEMORY_LIMIT_GB")
    if override:
        try:
            return float(override) * GB, "QVLC_MEMORY_LIMIT_GB"
        except ValueError:
            raise ConfigError(f"QVLC_MEMORY_LIMIT_GB={override!r} is not a number",
                              fix="set it to a size in GB, e.g. 16, or unset it", key="QVLC_MEMORY_LIMIT_GB") from None
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    limit = _cgroup_limit()
    return (min(total, limit), "the memory cgroup's limit") if limit and limit < total else (total, "this machine's RAM")


def _cgroup_limit() -> float | None:
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        files = ([Path("/sys/fs/cgroup") / path.lstrip("/") / "memory.max"] if controllers == "" else
                 [Path("/sys/fs/cgroup/memory") / path.lstrip("/") / "memory.limit_in_bytes"]
                 if "memory" in controllers.split(",") else [])
        for f in files:
            try:
                value = f.read_text().strip()
            except OSError:
                continue
            if value.isdigit():
                return float(value)
    return None


def check_memory(cfg: "Config", dims: "ModelDims") -> None:
    """Refuse, with the estimate and what would fit, a compile this machine cannot hold."""
    est = estimate(cfg, dims)
    have, source = available_bytes()
    if est.bytes <= have:
        return
    if cfg.part == "llm":
        key = "validate.enabled" if cfg.validate.enabled else "export.tp"
        fix = ("set validate.enabled: false (the export alone reads one rank's slices at a time), lower "
               "export.prefill_len, or" if cfg.validate.enabled else "raise export.tp, or")
    else:
        key, fix = "export.max_patches", "lower export.max_patches (attention grows with its square), or"
    raise ConfigError(f"this compile needs about {est.bytes / GB:.1f} GB ({est.describe()}; x{OVERHEAD} on the "
                      f"weights for the rest), more than the {have / GB:.1f} GB of {source}",
                      fix=f"{fix} run on a machine with at least {est.bytes / GB:.0f} GB", key=key)
