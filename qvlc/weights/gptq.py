"""Calibrated weight quantization (GPTQ, Frantar et al. 2022) and the file its integers live in (docs/quantization.md).

``gptq_quantize(w, hessian, ...)`` quantizes one Linear weight [out, in] column by column, folding each column's
rounding error into the columns not yet quantized through the inverse Hessian of the layer's inputs
(H = 2/N · Σ x xᵀ over the calibration tokens), so the *output* error on those inputs is smaller than round to
nearest's. It is the reference algorithm (``gptq.py`` of IST-DASLab, as AutoGPTQ runs it without act-order):
1 % damping of the mean diagonal, dead inputs zeroed, blocks of 128 columns, and — with groups — each group's
scale and zero point chosen from the weights as they are when the group is reached. The scales are rounded to
the activation dtype first, as ``quantize_rtn`` does, so the integers are chosen for the scale the graph stores.

The calibrated integers are the record every later step reads, never recomputed: ``GptqStore`` is a safetensors
file in the artifact (``calibration/gptq.safetensors``: per Linear ``<weight name>.q`` (int8, or two int4 values
per byte, low nibble first), ``.scale`` (float32) and, asymmetric, ``.zero_point``), written one layer at a time
into a file whose header is laid out before the first layer (its size is known from the shapes).
``CalibratedQuant`` reads it back for the export, the oracle and ``qvlc validate``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qvlc.precision import Precision, WeightFormat
from qvlc.weights.quant import QuantView, QuantWeight

DAMP = 0.01  # of the mean diagonal of H: the reference default (AutoGPTQ damp_percent, Qwen's GPTQ releases)
BLOCK = 128  # columns updated together (lazy batch updates); with groups, a whole number of groups


def gptq_quantize(w: np.ndarray, hessian, bits: int, group: int | None, symmetric: bool,
                  dtype: np.dtype = np.dtype(np.float16)) -> QuantWeight:
    """GPTQ of ``w`` [out, in] (float32) given ``hessian`` [in, in] (a torch tensor, fp32): per output channel
    (``group`` None: int8) or per ``group`` input rows; the encoding is ``quantize_rtn``'s."""
    import torch

    W = torch.from_numpy(np.array(w, dtype=np.float32))
    out, n = W.shape
    size = n if group is None else group
    H = hessian.clone().float()  # fp32, as the reference: the 7B down_proj's H is 1.4 GB already
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    H += DAMP * torch.mean(torch.diag(H)) * torch.eye(n, dtype=H.dtype)
    Hinv = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True)
    del H
    qmax = 2 ** (bits - 1) - 1 if symmetric else 2**bits - 1
    tiny = float(np.finfo(np.float16).tiny)
    Q = torch.zeros((out, n), dtype=torch.int16)
    scales = torch.zeros((out, n // size))
    zeros = torch.zeros((out, n // size))

    def params(cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if symmetric:
            s = torch.clamp(cols.abs().amax(dim=1) / qmax, min=tiny)
            z = torch.zeros_like(s)
        else:
            lo, hi = torch.clamp(cols.amin(dim=1), max=0), torch.clamp(cols.amax(dim=1), min=0)
            s = torch.clamp((hi - lo) / qmax, min=tiny)
        s = torch.from_numpy(s.numpy().astype(dtype).astype(np.float32))  # the scale the graph stores
        if not symmetric:
            z = torch.clamp(torch.round(-lo / s), 0, qmax)
        return s, z

    lo_q, hi_q = (-qmax, qmax) if symmetric else (0, qmax)
    block = size * max(1, BLOCK // size) if size < n else BLOCK  # groups never straddle a block
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        W1, Err1, Hinv1 = W[:, i1:i2].clone(), torch.zeros((out, i2 - i1)), Hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = i1 + i
            if col % size == 0:  # a group starts: its scale from the weights as they are now (updated so far)
                g = col // size
                scales[:, g], zeros[:, g] = params(W1[:, i:i + size] if size < n else W)
            s, z = scales[:, col // size], zeros[:, col // size]
            x = W1[:, i]
            q = torch.clamp(torch.round(x / s) + z, lo_q, hi_q)
            Q[:, col] = q.to(torch.int16)
            err = (x - (q - z) * s) / Hinv1[i, i]
            W1[:, i:] -= err[:, None] @ Hinv1[i, i:][None, :]
            Err1[:, i] = err
        W[:, i2:] -= Err1 @ Hinv[i1:i2, i2:]
    squeeze = (lambda a: a[:, 0]) if group is None else (lambda a: a)
    q = Q.numpy().astype(np.int8 if symmetric else np.uint8)
    return QuantWeight(q, squeeze(scales.numpy()), None if symmetric else squeeze(zeros.numpy()).astype(np.uint8),
                       bits, size)


# ---------------------------------------------------------------------------------------------- the store

STORE = "calibration/gptq.safetensors"  # in the artifact
_DTYPES = {"I8": np.int8, "U8": np.uint8, "F32": np.float32}


def _pack4(q: np.ndarray) -> np.ndarray:
    """[out, in] 4-bit values → uint8 [out, in / 2], element 2k in the low nibble (ONNX's INT4/UINT4 order)."""
    u = q.astype(np.uint8) & 0x0F
    return (u[:, 0::2] | (u[:, 1::2] << 4)).astype(np.uint8)


def _unpack4(p: np.ndarray, signed: bool) -> np.ndarray:
    lo, hi = p & 0x0F, p >> 4
    q = np.stack([lo, hi], axis=-1).reshape(p.shape[0], -1)
    return ((q.astype(np.int8) << 4) >> 4).astype(np.int8) if signed else q.astype(np.uint8)


@dataclass(frozen=True)
class StoreLayout:
    """What the store holds: how each weight was quantized and, per weight, its [out, in] shape."""

    bits: int
    group: int  # 0: per output channel
    symmetric: bool

    def entries(self, name: str, out: int, n: int) -> dict[str, tuple[str, list[int]]]:
        groups = 1 if not self.group else n // self.group
        scale_shape = [out] if not self.group else [out, groups]
        q = ("I8" if self.symmetric else "U8", [out, n if self.bits == 8 else n // 2])
        e = {f"{name}.q": q, f"{name}.scale": ("F32", scale_shape)}
        if not self.symmetric:
            e[f"{name}.zero_point"] = ("U8", scale_shape)
        return e


class GptqStore:
    """Writes the store: ``GptqStore(path, layout, {weight name: (out, in)})`` lays out the header and the file's
    full size; ``put(name, QuantWeight)`` writes one weight's tensors at their offsets; ``close()`` ends it."""

    def __init__(self, path: Path, layout: StoreLayout, shapes: dict[str, tuple[int, int]],
                 metadata: dict[str, str]) -> None:
        self.layout, self.path = layout, Path(path)
        header: dict = {"__metadata__": {**metadata, "layout": json.dumps(layout.__dict__)}}
        offset = 0
        for name, (out, n) in shapes.items():
            for key, (dt, shape) in layout.entries(name, out, n).items():
                size = int(np.prod(shape)) * np.dtype(_DTYPES[dt]).itemsize
                header[key] = {"dtype": dt, "shape": shape, "data_offsets": [offset, offset + size]}
                offset += size
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.base, self.header = 8 + len(raw), header
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.f = open(self.path, "wb")
        self.f.write(len(raw).to_bytes(8, "little") + raw)
        self.f.truncate(self.base + offset)

    def put(self, name: str, qw: QuantWeight) -> None:
        q = qw.q if self.layout.bits == 8 else _pack4(qw.q)
        for key, arr in ((f"{name}.q", q), (f"{name}.scale", qw.scale), (f"{name}.zero_point", qw.zero_point)):
            if key not in self.header:
                continue
            h = self.header[key]
            data = np.ascontiguousarray(arr, dtype=_DTYPES[h["dtype"]])
            if list(data.shape) != h["shape"]:
                raise ValueError(f"{key}: shape {list(data.shape)} is not the laid-out {h['shape']}")
            self.f.seek(self.base + h["data_offsets"][0])
            self.f.write(data.tobytes())

    def close(self) -> None:
        self.f.flush()
        self.f.close()


def read_store(path: Path, name: str, rows: slice | None = None) -> QuantWeight:
    """One weight of the store (``rows``: only those output rows)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="np") as f:
        layout = StoreLayout(**json.loads(f.metadata()["layout"]))
        keys = set(f.keys())

        def get(key):
            s = f.get_slice(key)
            return s[rows] if rows is not None else s[:]

        q = get(f"{name}.q")
        if layout.bits == 4:
            q = _unpack4(q, layout.symmetric)
        scale = get(f"{name}.scale")
        zp = get(f"{name}.zero_point") if f"{name}.zero_point" in keys else None
    return QuantWeight(q, scale, zp, layout.bits, layout.group or q.shape[1])


@dataclass(frozen=True)
class CalibratedQuant:
    """The weights GPTQ calibrated, read from the store (picklable for export workers)."""

    store: Path
    format: WeightFormat
    include: tuple[str, ...]
    dtype: Precision

    def tensor(self, linear) -> "CalibratedTensor":
        return CalibratedTensor(linear.weight, self)


class CalibratedTensor(QuantView):
    """A Linear weight seen through the store (a block of output rows reads only those rows)."""

    def __init__(self, lazy, quant: CalibratedQuant) -> None:
        self.quant, self.shape, self.name, self.dtype = quant, lazy.shape, lazy.name, quant.dtype

    def take(self, dim: int, start: int, length: int) -> QuantWeight:
        if dim == 0:
            return read_store(self.quant.store, self.name, slice(start, start + length))
        return read_store(self.quant.store, self.name).narrow(dim, start, length)
