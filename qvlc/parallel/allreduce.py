"""The explicit tensor-parallel reduction point: ``qvlc::all_reduce`` in torch, ``qvlc.AllReduce`` in ONNX.

In eager torch a single process holds one rank, so the op is the identity; the ONNX node it becomes tells the
runtime "sum this tensor over all ranks here". Validation runs the ranks with the node as an explicit sum.
Nothing is registered at import: the torch op on first use, the ONNX schema when a checker or exporter needs it.
"""

from __future__ import annotations

import functools

DOMAIN = "qvlc"
OP_TYPE = "AllReduce"
OPSET_VERSION = 1


@functools.cache
def _torch_op():
    import torch

    @torch.library.custom_op("qvlc::all_reduce", mutates_args=(), schema="(Tensor x) -> Tensor")
    def all_reduce_op(x: torch.Tensor) -> torch.Tensor:
        """Sum over tensor-parallel ranks. One process is one rank, so in eager mode this is the identity."""
        return x.clone()

    @all_reduce_op.register_fake
    def _(x: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(x)

    return all_reduce_op


def all_reduce(x):
    """Sum ``x`` over tensor-parallel ranks (the identity in one eager process; an AllReduce node in ONNX)."""
    return _torch_op()(x)


def _onnx_all_reduce(x):  # traced by onnxscript: becomes one qvlc.AllReduce node
    import onnxscript

    op = onnxscript.values.Opset(domain=DOMAIN, version=OPSET_VERSION)
    return op.AllReduce(x, reduction="sum")


def translation_table() -> dict:
    import torch

    _torch_op()
    register_onnx_schema()  # onnxscript looks the op up while tracing
    return {torch.ops.qvlc.all_reduce.default: _onnx_all_reduce}


def register_onnx_schema() -> None:
    """Make ``onnx.checker`` know qvlc.AllReduce (idempotent)."""
    import onnx

    if onnx.defs.has(OP_TYPE, DOMAIN):
        return
    T = "T"
    schema = onnx.defs.OpSchema(
        OP_TYPE, DOMAIN, OPSET_VERSION,
        doc="Element-wise sum of the input over all tensor-parallel ranks; every rank receives the sum.",
        inputs=[onnx.defs.OpSchema.FormalParameter("input", T, "this rank's partial result")],
        outputs=[onnx.defs.OpSchema.FormalParameter("output", T, "the sum over ranks, same shape")],
        type_constraints=[(T, ["tensor(float)", "tensor(float16)", "tensor(bfloat16)"], "float tensors")],
        attributes=[onnx.defs.OpSchema.Attribute("reduction", onnx.defs.OpSchema.AttrType.STRING,
                                                 "always 'sum'", required=False)],
    )
    onnx.defs.register_schema(schema)
