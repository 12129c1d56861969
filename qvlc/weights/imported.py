"""Checkpoints that are already quantized (``config.json`` ``quantization_config``): GPTQ and AWQ, read without
requantizing — the integers, scales and zero points the graphs carry are exactly the checkpoint's (docs/quantization.md).

Layouts (the ones Qwen's GPTQ-Int4/Int8 and AWQ releases use; the tests pack tiny checkpoints independently):

| method | ``qweight`` (int32) | ``qzeros`` (int32) | ``scales`` | zero point |
|---|---|---|---|---|
| gptq, bits b | [in·b/32, out]: 32/b values per word along the input, lowest bits first | [groups, out·b/32] along the output | [groups, out] | stored minus one (the v1 ``checkpoint_format: gptq`` convention): ``w = (q - (z + 1)) · s`` |
| awq (GEMM) | [in, out/8]: 8 nibbles per word along the output, in the order 0 2 4 6 1 3 5 7 | [groups, out/8], same order | [groups, out] | as stored: ``w = (q - z) · s`` |

A group is ``group_size`` consecutive input rows (``-1``: the whole row). GPTQ ``desc_act: true`` checkpoints
order the groups by activation (``g_idx`` is not ``i // group_size``): the groups are not contiguous blocks of
input rows, which neither ``DequantizeLinear`` nor the tensor-parallel split can express — refused, naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qvlc.errors import CheckpointError
from qvlc.precision import Precision
from qvlc.weights.quant import QuantView, QuantWeight

AWQ_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # nibble k of a word holds output column 8c + AWQ_ORDER[k]


@dataclass(frozen=True)
class ImportedQuant:
    """A checkpoint's own quantization, read from config.json (picklable for export workers)."""

    method: str  # gptq | awq
    bits: int
    group_size: int  # -1: one group per row
    include: tuple[str, ...] = ("llm",)  # the decoder's Linears (Qwen's releases keep lm_head and the tower float)
    dtype: Precision | None = None  # the export dtype the scales are stored in (set by the plan)

    def group(self, n_in: int) -> int:
        return n_in if self.group_size == -1 else self.group_size

    def shapes(self, out: int, n_in: int) -> dict[str, list[int]]:
        """The packed tensors a Linear of weight [out, in] has in the checkpoint."""
        groups = n_in // self.group(n_in)
        if self.method == "gptq":
            per = 32 // self.bits
            return {"qweight": [n_in // per, out], "qzeros": [groups, out // per], "scales": [groups, out]}
        return {"qweight": [n_in, out // 8], "qzeros": [groups, out // 8], "scales": [groups, out]}

    def tensor(self, linear) -> "ImportedTensor":
        return ImportedTensor(linear, self, self.dtype)


def imported_quant(config: dict, where: str) -> ImportedQuant | None:
    """config.json's ``quantization_config``, checked (None: not a quantized checkpoint)."""
    q = config.get("quantization_config")
    if not q:
        return None
    method = str(q.get("quant_method", "")).lower()
    key = "model.checkpoint"
    if method not in ("gptq", "awq"):
        raise CheckpointError(f"{where}: quantization_config.quant_method {method!r} is not one qvlc imports",
                              fix="use a gptq or awq checkpoint, or the unquantized one", key=key)
    bits, group = int(q.get("bits", 0)), int(q.get("group_size", -1))
    if method == "gptq" and bits not in (4, 8) or method == "awq" and bits != 4:
        raise CheckpointError(f"{where}: {method} with bits {bits} is not supported",
                              fix="use a 4-bit (or, for gptq, 8-bit) checkpoint", key=key)
    if method == "gptq" and q.get("desc_act"):
        raise CheckpointError(f"{where}: quantization_config.desc_act is true: its groups follow activation order "
                              "(g_idx), not contiguous input rows, which DequantizeLinear and the tensor-parallel "
                              "split cannot express", fix="use a desc_act: false checkpoint", key=key)
    if method == "gptq" and str(q.get("checkpoint_format", "gptq")) != "gptq":
        raise CheckpointError(f"{where}: checkpoint_format {q.get('checkpoint_format')!r} is not supported",
                              fix="use a checkpoint in the gptq (v1) format", key=key)
    if method == "awq" and str(q.get("version", "gemm")).lower() != "gemm":
        raise CheckpointError(f"{where}: awq version {q.get('version')!r} is not supported",
                              fix="use an awq GEMM checkpoint", key=key)
    return ImportedQuant(method, bits, group)


def _unpack(words: np.ndarray, bits: int, axis: int, order=None) -> np.ndarray:
    """int32 words → unsigned values, ``32/bits`` per word along ``axis`` (lowest bits first, or in ``order``)."""
    per = 32 // bits
    w = words.astype(np.uint32)
    vals = np.stack([(w >> (bits * k)) & (2**bits - 1) for k in range(per)], axis=-1)  # [..., per]
    if order is not None:
        vals = vals[..., np.argsort(order)]  # nibble k holds column order[k]: put column j at position j
    vals = np.moveaxis(vals, -1, axis + 1)
    shape = list(words.shape)
    shape[axis] *= per
    return vals.reshape(shape).astype(np.uint8)


def read_imported(node, quant: ImportedQuant) -> QuantWeight:
    """One Linear's packed tensors (a ``lazy.Tree`` node with qweight/qzeros/scales) → QuantWeight [out, in]."""
    def read(name):
        t = getattr(node, name)
        return t.narrow(0, 0, t.shape[0]).numpy()

    qweight, qzeros, scales = read("qweight"), read("qzeros"), read("scales").astype(np.float32)
    if quant.method == "gptq" and hasattr(node, "g_idx"):  # desc_act false: row i is in group i // group_size
        g_idx = read("g_idx")
        if not np.array_equal(g_idx, np.arange(len(g_idx)) // quant.group(len(g_idx))):
            raise CheckpointError(f"{node.scales.name}: g_idx is not in input order although desc_act is false",
                                  fix="use a checkpoint whose g_idx matches its desc_act", key="model.checkpoint")
    if quant.method == "gptq":
        q = _unpack(qweight, quant.bits, 0).T  # [in, out] → [out, in]
        zp = (_unpack(qzeros, quant.bits, 1).astype(np.int16) + 1).astype(np.uint8).T
    else:
        q = _unpack(qweight, 4, 1, AWQ_ORDER).T
        zp = _unpack(qzeros, 4, 1, AWQ_ORDER).T
    scale = np.ascontiguousarray(scales.T)  # [out, groups]
    n_in = q.shape[1]
    group = quant.group(n_in)
    if quant.group_size == -1:  # one scale per output row
        return QuantWeight(np.ascontiguousarray(q), scale[:, 0], np.ascontiguousarray(zp[:, 0]), quant.bits, n_in)
    return QuantWeight(np.ascontiguousarray(q), scale, np.ascontiguousarray(zp), quant.bits, group)


class ImportedTensor(QuantView):
    """A quantized Linear of the checkpoint (its packed tensors) seen as its weight [out, in]."""

    def __init__(self, node, quant: ImportedQuant, dtype) -> None:
        self.node, self.quant, self.dtype = node, quant, dtype
        scales = node.scales
        self.name = scales.name.rsplit(".", 1)[0] + ".weight"
        n_out = scales.shape[1]
        q = node.qweight
        self.shape = (n_out, q.shape[0] * (32 // quant.bits) if quant.method == "gptq" else q.shape[0])

    def take(self, dim: int, start: int, length: int) -> QuantWeight:
        return read_imported(self.node, self.quant).narrow(dim, start, length)
