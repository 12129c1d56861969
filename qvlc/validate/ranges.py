"""fp16 hazards: the largest magnitudes the fp32 oracle meets while it runs the validation cases.

An accelerator computes these graphs in fp16, and real Qwen2-VL / Qwen2.5-VL weights overflow it (transformers
issue 33294; llama.cpp issue 17534: the down projection of Qwen2.5-VL-3B's vision block 31 reaches -inf). ONNX
Runtime on CPU does not show it — it runs fp16 MatMuls in fp32 — so parity alone cannot. While the oracle runs
(``RangeRecorder.recording``), every linear layer's input and output, the residual stream after every layer (or
vision block) and the attention scores before softmax are reduced to their largest magnitude, per module and
case, and to the fraction of their nonzero values below fp16's normal range.

- **overflow**: beyond fp16's largest finite value (65504) — the fp16 graph computes inf/nan there. An fp16
  compile with one fails; an fp32 compile reports it as advice for an fp16 build.
- **near**: within ``NEAR_FACTOR`` of it (above 65504 / 4): two exponent steps of headroom is less than one
  unusual input needs (a brighter image, a longer prompt moves the residual stream by this much). Reported.
- **underflow**: more than ``UNDERFLOW_FRACTION`` (half) of a tensor's nonzero values below fp16's smallest normal
  number (2^-14 ≈ 6.1e-5): there fp16 keeps fewer than 10 significant bits, and below 2^-25 nothing (exact zero).
  Half, not a few percent: an activation's tail (GELU of a very negative input) is legitimately tiny and barely
  moves the next MatMul; a tensor whose typical value is subnormal has lost its precision.
  A massive activation does this to everything else in its row after the next norm: the norm divides by the
  outlier's size, and the linear after it reads values of ~1e-5 (seen on planted outliers: the lm_head's and the
  vision merger's inputs). Reported; ``fp32_layers: auto`` keeps the reading module in fp32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from unittest import mock

import torch
from torch import nn

from qvlc.models.common.islands import Islands, selects

FP16_MAX = 65504.0
NEAR_FACTOR = 4.0
FP16_MIN_NORMAL = 2.0**-14
UNDERFLOW_FRACTION = 0.5
UNDERFLOW_SAMPLE = 1 << 16

LINEAR, LINEAR_IN = "linear output", "linear input"
RESIDUAL, SCORES = "residual stream", "attention scores"
KINDS = (LINEAR_IN, LINEAR, RESIDUAL, SCORES)


@dataclass
class RangeStat:
    module: str  # transformers' module name, e.g. model.language_model.layers.27.mlp.down_proj
    kind: str  # one of KINDS
    max_abs: float  # over every case
    case: str  # the case where max_abs was met
    underflow: float = 0.0  # worst fraction of nonzero values that round to zero in fp16
    underflow_case: str = ""

    def level(self) -> str | None:
        if self.max_abs > FP16_MAX:
            return "overflow"
        if self.max_abs > FP16_MAX / NEAR_FACTOR:
            return "near"
        if self.underflow > UNDERFLOW_FRACTION:
            return "underflow"
        return None

    def to_json(self) -> dict:
        return {"module": self.module, "kind": self.kind, "max_abs": self.max_abs, "case": self.case,
                "underflow_fraction": self.underflow, "underflow_case": self.underflow_case,
                "level": self.level()}


Segments = list[tuple[str, int, int]]  # (case, first row, end row) of a packed tensor's leading rows


class RangeRecorder:
    """Collects RangeStats while the oracle runs inside ``recording()``: ``hook(layer, prefix, segments, packed)``
    on each transformers module as it runs (a decoder layer or a vision block); ``segments`` says which case owns
    which rows (one case per call for the LLM oracle; the vision oracle packs every case in one call)."""

    def __init__(self, attn_name: str = "self_attn", enabled: bool = True) -> None:
        self.enabled = enabled  # False: hooks nothing, records nothing (the oracle run alone)
        self.stats: dict[tuple[str, str], RangeStat] = {}
        self._scope = None  # (prefix, segments, packed, row offset) of the layer running
        self._last = None  # (tensor, how, result) of the last reduction
        self._attn_name = attn_name  # the attention module's name inside a layer: self_attn, or attn (vision)

    # -- recording ------------------------------------------------------------------------------------------
    def observe(self, module: str, kind: str, x: torch.Tensor, segments: Segments, rows_dim: int = 0,
                whole: bool = False) -> None:
        """``whole``: the tensor is one case's (segments[0]); otherwise ``segments`` index dimension ``rows_dim``."""
        if not self.enabled:
            return
        for case, peak, frac in self._reduce(x, kind == SCORES, segments, rows_dim, whole):
            key = (module, kind)
            stat = self.stats.get(key)
            if stat is None:
                self.stats[key] = RangeStat(module, kind, peak, case, frac, case)
                continue
            if peak > stat.max_abs:
                stat.max_abs, stat.case = peak, case
            if frac > stat.underflow:
                stat.underflow, stat.underflow_case = frac, case

    def _reduce(self, x: torch.Tensor, masked: bool, segments: Segments, rows_dim: int,
                whole: bool) -> list[tuple[str, float, float]]:
        """(case, largest magnitude, underflow fraction) per segment. The peak is exact, in one pass without a copy
        (``aminmax``; masked scores, which carry the fp32 minimum, are zeroed first); the underflow fraction is
        taken on an evenly strided sample of at most ``UNDERFLOW_SAMPLE`` values per segment — a fraction
        compared with one half needs no more. (Recording costs the oracle little this way; see
        benchmarks/bench_ranges.py.) The tensor reduced just before is not reduced again (q, k and v, gate and
        up read one input: the same object)."""
        if self._last is not None and self._last[0] is x and self._last[1] == (masked, id(segments)):
            return self._last[2]
        original = x
        x = x.detach()
        if x.dtype != torch.float32:
            x = x.float()
        if masked:
            x = torch.where(x > torch.finfo(torch.float32).min / 2, x, 0.0)
        rows = x.reshape(1, -1) if whole else x.movedim(rows_dim, 0).reshape(x.shape[rows_dim], -1)
        lo, hi = torch.aminmax(rows, dim=1)
        peak = torch.maximum(-lo, hi)
        out = []
        for case, a, b in ([(segments[0][0], 0, 1)] if whole else segments):
            a, b = min(a, len(peak)), min(b, len(peak))
            if a >= b:
                continue
            flat = rows[a:b].reshape(-1)
            sample = flat[::max(1, flat.numel() // UNDERFLOW_SAMPLE)].abs()
            nonzero = int(torch.count_nonzero(sample))
            tiny = nonzero - int(torch.count_nonzero(sample >= FP16_MIN_NORMAL))
            out.append((case, float(peak[a:b].max()), tiny / nonzero if nonzero else 0.0))
        # one reference (not to scores, which are large and seen once), dropped at the next reduction
        self._last = None if masked else (original, (masked, id(segments)), out)
        return out

    @contextlib.contextmanager
    def recording(self) -> Iterator[None]:
        """Attention scores are seen through ``softmax`` (transformers' eager attention calls it on the scores
        plus mask): patched once for the oracle's run, attributed to the layer that is running."""
        if not self.enabled:
            yield
            return
        real = torch.nn.functional.softmax

        def softmax(x, *args, **kwargs):
            if self._scope is not None:
                prefix, segments, packed, offset = self._scope
                if packed:  # the vision tower: [1, heads, l, l] per frame or window, in row order
                    owner = next((c for c, a, b in segments if a <= offset[0] < b), segments[-1][0])
                    offset[0] += x.shape[-2]
                else:  # the decoder: one sequence, [1, heads, T, T]
                    owner = segments[0][0]
                self.observe(f"{prefix}.{self._attn_name}", SCORES, x, [(owner, 0, 1)], 0, whole=True)
            return real(x, *args, **kwargs)

        with mock.patch.object(torch.nn.functional, "softmax", softmax):
            yield

    def hook(self, layer: nn.Module, prefix: str, segments: Segments, packed: bool, residual: bool = True) -> list:
        """Record ``layer``'s linear outputs, its output (the residual stream) and, inside ``recording()``, its
        attention scores. ``segments``: which case owns which rows of the layer's activations — for the decoder
        one case per call over all of [1, T, C]; for the vision tower (``packed``) row ranges of the packed
        [N, C]. ``residual``: the module's output is the residual stream (not for the merger). Returns the hook
        handles (``remove()`` each when the layer is done)."""
        if not self.enabled:
            return []
        whole = not packed
        handles = []
        for name, sub in layer.named_modules():
            if isinstance(sub, (nn.Linear, nn.Conv3d)):  # Conv3d: the patch embedding, a linear map of a patch
                full = f"{prefix}.{name}"

                def seen(m, i, out, full=full) -> None:  # a forward hook that returns something replaces the output
                    self.observe(full, LINEAR_IN, i[0], segments, 0, whole)
                    self.observe(full, LINEAR, out, segments, 0, whole)

                handles.append(sub.register_forward_hook(seen))

        def enter(m, args):
            self._scope = (prefix, segments, packed, [0])

        def leave(m, args, out):
            self._scope = None
            self._last = None
            if residual:
                self.observe(prefix, RESIDUAL, out[0] if isinstance(out, tuple) else out, segments, 0, whole)

        handles.append(layer.register_forward_pre_hook(enter))
        handles.append(layer.register_forward_hook(leave))
        return handles

    def to_report(self, report, islands: Islands = Islands()) -> None:
        """Fill a ParityReport's ``hazards`` (each marked ``fp32`` when the graph computes it in an fp32 island, so
        an fp16 graph does not fail on it) and ``range_peaks``."""
        report.hazards = [{**s.to_json(), "fp32": covered(s, islands)} for s in self.hazards()]
        report.range_peaks = {k: p.to_json() for k in KINDS if (p := self.peak(k)) is not None}

    # -- results --------------------------------------------------------------------------------------------
    def hazards(self) -> list[RangeStat]:
        """The stats with a level, worst first (overflow, near, underflow; then by magnitude)."""
        order = {"overflow": 0, "near": 1, "underflow": 2}
        found = [s for s in self.stats.values() if s.level() is not None]
        return sorted(found, key=lambda s: (order[s.level()], -s.max_abs))

    def peak(self, kind: str) -> RangeStat | None:
        stats = [s for s in self.stats.values() if s.kind == kind]
        return max(stats, key=lambda s: s.max_abs) if stats else None


def covered(stat: RangeStat, islands: Islands) -> bool:
    """Whether the fp16 graph computes ``stat``'s tensor in fp32: a module inside an island unit, or a residual
    stream the graph carries in fp32."""
    if stat.kind == RESIDUAL and not stat.module.endswith("patch_embed"):
        index = int(stat.module.rsplit(".", 1)[1])
        return islands.residual_fp32(index)
    return any(selects(stat.module, u) for u in islands.units)


def remove(handles: list) -> None:
    for h in handles:
        h.remove()
