"""Integer weights in standard ONNX: the graph pass that replaces each quantized Linear's float initializer by its
integers and a dequantization right before its MatMul (docs/quantization.md).

The graphs hold ``x @ W_t`` with ``W_t = W^T`` [in, out] (``qvlc.models.common.layers.Linear``), so the integers
are stored transposed too:

| format | integers | scale (activation dtype) | zero point (asymmetric only) | dequantize |
|---|---|---|---|---|
| int8 | INT8 [in, out] (UINT8 asymmetric) | [out] | UINT8 [out] | ``DequantizeLinear(axis=1)`` |
| int4, ``blocked`` | INT4 [in, out] (UINT4 asymmetric), 2 per byte | [in/g, out] | UINT4 [in/g, out] | ``DequantizeLinear(axis=0, block_size=g)``, opset 21 |
| int4, ``explicit`` | INT8/UINT8 [in, out], one per byte | [in/g, 1, out] | UINT8 [in/g, 1, out] | Cast → Reshape → (Sub) → Mul → Reshape |

All three compute ``(q - zero_point) * scale`` rounded once to the scale's dtype — the product of a small integer
and an fp16 scale is exact in fp32 — so ``explicit`` equals ``blocked`` bitwise; it exists for compilers that
refuse blocked ``DequantizeLinear`` (TVM 0.27's Relax frontend mis-sizes INT4 initializers and has no blocked
dequantization). The pass checks that the dequantized integers equal the float initializer it replaces, bit for
bit: the module computed with exactly the weights the graph now carries.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx_ir as ir

from qvlc.weights.quant import QuantWeight


def _const(graph: ir.Graph, name: str, array: np.ndarray) -> ir.Value:
    value = ir.Value(name=name, const_value=ir.Tensor(array, name=name), shape=ir.Shape(array.shape),
                     type=ir.TensorType(ir.DataType.from_numpy(array.dtype)))
    graph.register_initializer(value)
    return value


def _int4(values: np.ndarray, signed: bool) -> np.ndarray:
    return values.astype(ml_dtypes.int4 if signed else ml_dtypes.uint4, order="C")


def _transposed(qw: QuantWeight, dtype: np.dtype, packed: bool, shared: dict | None, name: str) -> tuple:
    """(q, scale, zero point) transposed to [in, out], as the graph stores them: the integers as a view of ``qw.q``
    (int8) or one int4 copy, made once per weight when ``shared`` is kept across the rank's graphs (prefill and
    decode hold the same arrays: measured, a 7B int8 rank export held 9.3 GB with a copy per graph)."""
    if shared is not None and name in shared:
        return shared[name]
    signed = qw.zero_point is None
    q_t = qw.q.T if not packed else _int4(qw.q.T, signed)
    zp_t = None if signed else (qw.zero_point.T if not packed else _int4(qw.zero_point.T, False))
    out = (q_t, np.ascontiguousarray(qw.scale.T).astype(dtype), zp_t)
    if shared is not None:
        shared[name] = out
    return out


def dequantize_nodes(graph: ir.Graph, name: str, qw: QuantWeight, dtype: np.dtype, explicit: bool = False,
                     shared: dict | None = None) -> tuple[list[ir.Node], ir.Value]:
    """Register ``qw``'s initializers (``{name}.q``, ``.scale``, ``.zero_point``) in ``graph``; returns the nodes
    that turn them into ``W_t`` [in, out] in ``dtype`` (not yet inserted) and the value they produce."""
    blocked = qw.scale.ndim == 1 or not explicit
    q_t, scale_t, zp_t = _transposed(qw, dtype, blocked and qw.bits == 4, shared, name)
    elem = ir.DataType.from_numpy(np.dtype(dtype))
    if blocked:
        per_axis = qw.scale.ndim == 1  # int8 groups (imported GPTQ) are blocked INT8
        inputs = [_const(graph, f"{name}.q", q_t), _const(graph, f"{name}.scale", scale_t)]
        if zp_t is not None:
            inputs.append(_const(graph, f"{name}.zero_point", zp_t))
        attrs = {"axis": 1} if per_axis else {"axis": 0, "block_size": qw.group}
        node = ir.node("DequantizeLinear", inputs, attrs, name=f"{name}/dequantize")
        node.outputs[0].name = f"{name}.dequantized"
        return [node], node.outputs[0]
    n_in, n_out = q_t.shape  # explicit int4: one integer per byte, plain ops every ONNX importer knows
    nodes = [ir.node("Cast", [_const(graph, f"{name}.q", q_t)], {"to": elem})]
    grouped = _const(graph, f"{name}.grouped", np.array([n_in // qw.group, qw.group, n_out], np.int64))
    nodes.append(ir.node("Reshape", [nodes[-1].outputs[0], grouped]))
    if zp_t is not None:
        zp = ir.node("Cast", [_const(graph, f"{name}.zero_point", zp_t[:, None, :])], {"to": elem})
        nodes += [zp, ir.node("Sub", [nodes[-1].outputs[0], zp.outputs[0]])]
    nodes.append(ir.node("Mul", [nodes[-1].outputs[0], _const(graph, f"{name}.scale", scale_t[:, None, :])]))
    shape = _const(graph, f"{name}.shape", np.array([n_in, n_out], np.int64))
    nodes.append(ir.node("Reshape", [nodes[-1].outputs[0], shape], name=f"{name}/dequantize"))
    nodes[-1].outputs[0].name = f"{name}.dequantized"
    return nodes, nodes[-1].outputs[0]


def quantize_graph(model: ir.Model, weights: dict[str, QuantWeight], explicit: bool = False,
                   shared: dict | None = None) -> list[str]:
    """Replace each initializer named in ``weights`` by its integers and a dequantization inserted before its first
    consumer; returns the names replaced. ``shared`` (a dict kept across graphs of one weights file) makes the
    graphs hold the same integer arrays. Raises RuntimeError when a weight has no initializer in the graph or an
    initializer is not what ``weights`` dequantizes to (a bug: the module must have been built from these very
    integers)."""
    graph = model.graph
    missing = sorted(set(weights) - set(graph.initializers))
    if missing:
        raise RuntimeError(f"{graph.name}: quantized weights without a graph initializer: {missing[:3]}")
    order = {id(node): i for i, node in enumerate(graph)}
    done = []
    for name in sorted(weights):
        value = graph.initializers[name]
        current = value.const_value.numpy()
        dtype = current.dtype
        expected = weights[name].dequantize(dtype).T
        if current.shape != expected.shape or not np.array_equal(current, expected):
            raise RuntimeError(f"{name}: the graph's weights are not the dequantized integers (shape "
                               f"{list(current.shape)} vs {list(expected.shape)})")
        nodes, out = dequantize_nodes(graph, name, weights[name], dtype, explicit, shared)
        first = min((use.node for use in value.uses()), key=lambda n: order.get(id(n), len(order)))
        graph.insert_before(first, nodes)
        value.replace_all_uses_with(out)
        graph.initializers.pop(name)
        done.append(name)
    return done
