"""Round-to-nearest weight quantization in NumPy, and the checkpoint view that hands the deployment modules (and
the oracle) the dequantized weights while remembering each rank's integer slice (docs/quantization.md).

``WeightQuant`` says what to quantize; ``DequantizedTensor`` wraps one checkpoint tensor of ``lazy.Tree``: a
deployment module that narrows it gets ``(q - zero_point) * scale`` in the export dtype — exactly what the graph's
dequantization computes — and the tensor keeps the matching ``QuantWeight`` slice, which the export pass
(``qvlc.export.quantize``) writes into the graph in place of the float initializer. Which Linears of a model take
the view is the model's knowledge (``qvlc.models.common.quantized``).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qvlc.precision import Precision, WeightFormat


@dataclass(frozen=True)
class WeightQuant:
    """Which weights to quantize and how (``export.weights``, resolved); picklable for export workers."""

    format: WeightFormat
    group: int  # int4: input rows per scale
    symmetric: bool
    include: tuple[str, ...]  # llm, lm_head
    dtype: Precision  # the activation dtype the scales (and dequantized weights) are stored in

    @classmethod
    def of(cls, weights, dtype: Precision) -> "WeightQuant | None":
        """From ``export.weights`` (None when the weights stay in the export dtype)."""
        if weights.format == WeightFormat.NONE:
            return None
        return cls(weights.format, weights.group_size, weights.symmetric, tuple(weights.include), dtype)

    def tensor(self, linear) -> "DequantizedTensor":
        """The view of one Linear of a ``lazy.Tree`` the deployment modules and the oracle read."""
        return DequantizedTensor(linear.weight, self)

    def quantize(self, w: np.ndarray) -> "QuantWeight":
        return quantize_rtn(w, self.format.bits, None if self.format == WeightFormat.INT8 else self.group,
                            self.symmetric, self.dtype.numpy)


class QuantView:
    """A quantized Linear weight [out, in] as the deployment modules and the oracles read a checkpoint tensor:
    ``narrow`` returns the dequantized slice (float32 values of the export dtype, what the graph's dequantization
    computes) and records the integer slice in ``taken``. Subclasses say where the integers come from (``take``):
    round to nearest here, a GPTQ/AWQ checkpoint (``imported``), the calibration store (``gptq``)."""

    shape: tuple
    name: str
    dtype: Precision
    taken: "QuantWeight | None" = None

    def detach(self) -> "QuantView":
        return self

    def take(self, dim: int, start: int, length: int) -> "QuantWeight":
        raise NotImplementedError

    def narrow(self, dim: int, start: int, length: int):
        import torch

        self.taken = self.take(dim, start, length)
        return torch.from_numpy(self.taken.dequantize(self.dtype.numpy).astype(np.float32))


class DequantizedTensor(QuantView):
    """A checkpoint tensor read through ``WeightQuant`` (round to nearest)."""

    def __init__(self, lazy, quant: WeightQuant) -> None:
        self.lazy, self.quant, self.shape, self.name, self.dtype = lazy, quant, lazy.shape, lazy.name, quant.dtype

    def take(self, dim: int, start: int, length: int) -> "QuantWeight":
        """Round-to-nearest quantizes each output row on its own, so a block of rows reads and quantizes only
        those rows (the oracle's lm_head blocks, column-split ranks); a column slice needs whole rows (an int8
        row has one scale)."""
        if dim == 0:
            return self.quant.quantize(self.lazy.narrow(0, start, length).float().numpy())
        return self.quant.quantize(self.lazy.narrow(0, 0, self.shape[0]).float().numpy()).narrow(dim, start, length)


@dataclass(frozen=True)
class QuantWeight:
    """One quantized weight in the Hugging Face layout [out, in]: ``q`` the integers (int8 storage, unsigned values
    when a zero point is present), ``scale`` float32 [out] (int8) or [out, in / group] (int4), ``zero_point`` the
    same shape as ``scale`` (or None: symmetric)."""

    q: np.ndarray
    scale: np.ndarray
    zero_point: np.ndarray | None
    bits: int
    group: int  # input rows per scale; the whole input for int8

    def dequantize(self, dtype: np.dtype) -> np.ndarray:
        """``(q - zero_point) * scale`` in ``dtype`` [out, in]: what every encoding above computes."""
        zp = 0 if self.zero_point is None else self.zero_point.astype(np.float32)
        scale = self.scale.astype(dtype).astype(np.float32)  # the graph stores the scale in the activation dtype
        if self.scale.ndim == 1:  # one scale per output row
            w = (self.q.astype(np.float32) - (zp if np.isscalar(zp) else zp[:, None])) * scale[:, None]
        else:
            out, n = self.q.shape
            g = self.q.reshape(out, n // self.group, self.group).astype(np.float32)
            zpg = zp if np.isscalar(zp) else zp[:, :, None]
            w = ((g - zpg) * scale[:, :, None]).reshape(out, n)
        return w.astype(dtype)

    def narrow(self, dim: int, start: int, length: int) -> "QuantWeight":
        """The slice a tensor-parallel rank holds: output rows (``dim`` 0) take their scales and zero points with
        them; input columns (``dim`` 1) take their groups' (int4: the slice must start and end on a group) or
        keep each row's one scale (int8)."""
        stop = start + length
        if dim == 0:
            pick = lambda a: None if a is None else a[start:stop]  # noqa: E731
            return QuantWeight(self.q[start:stop], pick(self.scale), pick(self.zero_point), self.bits, self.group)
        if self.scale.ndim == 1:
            return QuantWeight(self.q[:, start:stop], self.scale, self.zero_point, self.bits, length)
        if start % self.group or length % self.group:
            raise ValueError(f"columns {start}:{stop} cut groups of {self.group}")  # refused by the config checks
        g0, g1 = start // self.group, stop // self.group
        zp = None if self.zero_point is None else self.zero_point[:, g0:g1]
        return QuantWeight(self.q[:, start:stop], self.scale[:, g0:g1], zp, self.bits, self.group)


def quantize_rtn(w: np.ndarray, bits: int, group: int | None, symmetric: bool,
                 dtype: np.dtype = np.dtype(np.float16)) -> QuantWeight:
    """Round-to-nearest of ``w`` [out, in] (float32) per output channel (``group`` None: int8) or per ``group``
    input rows of each output channel. Symmetric: signed integers in ±(2^(bits-1) - 1), scale = max|w| / that.
    Asymmetric: unsigned integers in [0, 2^bits - 1] with a zero point. Scales are rounded to ``dtype`` (what the
    graph stores) before the integers are chosen, so the integers are the nearest for the scale actually used."""
    w = np.asarray(w, dtype=np.float32)
    out, n = w.shape
    size = n if group is None else group
    if n % size:
        raise ValueError(f"input size {n} is not a multiple of the group size {size}")
    g = w.reshape(out, n // size, size)
    tiny = np.float32(np.finfo(np.float16).tiny)
    if symmetric:
        qmax = 2 ** (bits - 1) - 1
        scale = np.maximum(np.abs(g).max(axis=2) / qmax, tiny).astype(dtype).astype(np.float32)
        q = np.clip(np.rint(g / scale[:, :, None]), -qmax, qmax)
        zp = None
    else:
        qmax = 2**bits - 1
        lo, hi = np.minimum(g.min(axis=2), 0), np.maximum(g.max(axis=2), 0)
        scale = np.maximum((hi - lo) / qmax, tiny).astype(dtype).astype(np.float32)
        zp = np.clip(np.rint(-lo / scale), 0, qmax)
        q = np.clip(np.rint(g / scale[:, :, None]) + zp[:, :, None], 0, qmax)
    squeeze = (lambda a: a[:, 0]) if group is None else (lambda a: a)
    return QuantWeight(q.reshape(out, n).astype(np.int8 if symmetric else np.uint8), squeeze(scale),
                       None if zp is None else squeeze(zp).astype(np.uint8), bits, size)
