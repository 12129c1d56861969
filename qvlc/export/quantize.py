"""Weight-only quantization in standard ONNX: round-to-nearest int8 (per output channel) and int4 (per group of
input rows), and the three ways a graph can carry the integers (groundwork of issue 9: not yet reachable from a
config — the export stage, the tensor-parallel slicing and the two proofs are the next steps).

The graphs hold ``x @ W_t`` with ``W_t = W^T`` [in, out] (``qvlc.models.common.layers.Linear``), so a quantized
weight is stored transposed too, and dequantized to the activation dtype right before its MatMul:

| format | integers | scale (activation dtype) | zero point (asymmetric only) | dequantize |
|---|---|---|---|---|
| int8 | INT8 [in, out] (UINT8 asymmetric) | [out] | UINT8 [out] | ``DequantizeLinear(axis=1)`` |
| int4, ``blocked`` | INT4 [in, out] (UINT4 asymmetric), 2 per byte | [in/g, out] | UINT4 [in/g, out] | ``DequantizeLinear(axis=0, block_size=g)``, opset 21 |
| int4, ``explicit`` | INT8/UINT8 [in, out], one per byte | [in/g, out] | UINT8 [in/g, out] | Cast → Sub → Reshape → Mul → Reshape |

All three compute ``(q - zero_point) * scale`` rounded once to the scale's dtype — the product of a small integer
and an fp16 scale is exact in fp32 — so ``explicit`` equals ``blocked`` bitwise; it exists for compilers that
refuse blocked ``DequantizeLinear`` (TVM 0.27's Relax frontend: "blocked quantization is not supported yet").
"""

from __future__ import annotations

from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx
from onnx import helper, numpy_helper

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
        if self.group == self.q.shape[1]:
            w = (self.q.astype(np.float32) - (zp if np.isscalar(zp) else zp[:, None])) * scale[:, None]
        else:
            out, n = self.q.shape
            g = self.q.reshape(out, n // self.group, self.group).astype(np.float32)
            zpg = zp if np.isscalar(zp) else zp[:, :, None]
            w = ((g - zpg) * scale[:, :, None]).reshape(out, n)
        return w.astype(dtype)


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


def _int4(values: np.ndarray, signed: bool) -> np.ndarray:
    return values.astype(ml_dtypes.int4 if signed else ml_dtypes.uint4)


def dequantize_nodes(name: str, qw: QuantWeight, dtype: np.dtype, explicit: bool = False,
                     ) -> tuple[list[onnx.NodeProto], list[onnx.TensorProto], str]:
    """The nodes and initializers that turn ``qw`` into ``W_t`` [in, out] in ``dtype``; returns (nodes,
    initializers, the name of the dequantized value). Integer initializers are named ``{name}.q``."""
    signed = qw.zero_point is None
    q_t = np.ascontiguousarray(qw.q.T)
    scale_t = np.ascontiguousarray(qw.scale.T).astype(dtype)
    zp_t = None if signed else np.ascontiguousarray(qw.zero_point.T)
    out = f"{name}.dequantized"
    if qw.bits == 8 or not explicit:
        per_axis = qw.bits == 8
        ints = q_t if per_axis else _int4(q_t, signed)
        inits = [numpy_helper.from_array(ints, f"{name}.q"), numpy_helper.from_array(scale_t, f"{name}.scale")]
        if zp_t is not None:
            inits.append(numpy_helper.from_array(zp_t if per_axis else _int4(zp_t, False), f"{name}.zero_point"))
        attrs = {"axis": 1} if per_axis else {"axis": 0, "block_size": qw.group}
        node = helper.make_node("DequantizeLinear", [i.name for i in inits], [out], name=f"{name}/dequantize",
                                **attrs)
        return [node], inits, out
    # explicit int4: one integer per byte, plain ops any ONNX importer knows
    n_in, n_out = q_t.shape
    elem = helper.np_dtype_to_tensor_dtype(np.dtype(dtype))
    inits = [numpy_helper.from_array(q_t, f"{name}.q"),
             numpy_helper.from_array(scale_t[:, None, :], f"{name}.scale"),
             numpy_helper.from_array(np.array([n_in // qw.group, qw.group, n_out], np.int64), f"{name}.grouped"),
             numpy_helper.from_array(np.array([n_in, n_out], np.int64), f"{name}.shape")]
    nodes = [helper.make_node("Cast", [f"{name}.q"], [f"{name}.qf"], to=elem)]
    value = f"{name}.qf"
    nodes.append(helper.make_node("Reshape", [value, f"{name}.grouped"], [f"{name}.qg"]))
    value = f"{name}.qg"
    if zp_t is not None:
        inits.append(numpy_helper.from_array(zp_t[:, None, :], f"{name}.zero_point"))
        nodes += [helper.make_node("Cast", [f"{name}.zero_point"], [f"{name}.zpf"], to=elem),
                  helper.make_node("Sub", [value, f"{name}.zpf"], [f"{name}.centered"])]
        value = f"{name}.centered"
    nodes += [helper.make_node("Mul", [value, f"{name}.scale"], [f"{name}.wg"]),
              helper.make_node("Reshape", [f"{name}.wg", f"{name}.shape"], [out])]
    return nodes, inits, out


def quantize_graph(model: onnx.ModelProto, weights: dict[str, QuantWeight], dtype: np.dtype,
                   explicit: bool = False) -> list[str]:
    """Replace each initializer named in ``weights`` (a ``…weight_t`` [in, out] feeding MatMuls) by its integers
    and a dequantization before its first use; returns the names replaced. The float initializer is removed."""
    g = model.graph
    wanted = {i.name for i in g.initializer} & set(weights)
    if not wanted:
        return []
    keep = [i for i in g.initializer if i.name not in wanted]
    del g.initializer[:]
    g.initializer.extend(keep)
    new_nodes: list[onnx.NodeProto] = []
    done: dict[str, str] = {}
    for node in g.node:
        for k, inp in enumerate(node.input):
            if inp in wanted:
                if inp not in done:
                    nodes, inits, value = dequantize_nodes(inp, weights[inp], dtype, explicit)
                    new_nodes += nodes
                    g.initializer.extend(inits)
                    done[inp] = value
                node.input[k] = done[inp]
        new_nodes.append(node)
    del g.node[:]
    g.node.extend(new_nodes)
    return sorted(done)

