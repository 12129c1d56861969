"""Which Linears of the shared deployment modules take a weight format (``qvlc.weights``): the decoder stack's seven
per layer and ``lm_head``, every 2-D weight of the vision tower but the patch embedding; and the name each becomes
in the graphs. The weight formats themselves know no model; this is where the model meets them."""

from __future__ import annotations

from qvlc.weights.quant import DequantizedTensor, QuantWeight, WeightQuant

# 2-D weights of a vision tower that are no Linear: the patch embedding (a convolution), a learned position table
NOT_LINEAR = ("patch_embed.", "pos_embed.")
LINEARS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
           "mlp.up_proj", "mlp.down_proj")


def linear_at(layer, path: str):
    """The Linear at dotted ``path`` (``mlp.down_proj``) of a decoder layer: a ``lazy.Tree`` node or a module."""
    for p in path.split("."):
        layer = getattr(layer, p)
    return layer


def rank_weights(text, head, quant: WeightQuant | None) -> dict[str, "QuantWeight"]:
    """The integer slices the deployment modules took, by the name of the graph initializer each became (the
    generic decoder stack's Linears: ``stack.layers.{i}.{path}.weight_t``, ``stack.lm_head.weight_t``)."""
    if quant is None:
        return {}
    out = {}
    for i, layer in enumerate(text.layers):
        for path in LINEARS:
            node = linear_at(layer, path)
            if getattr(node.weight, "taken", None) is not None:
                out[f"stack.layers.{i}.{path}.weight_t"] = node.weight.taken
    if getattr(head.weight, "taken", None) is not None:
        out["stack.lm_head.weight_t"] = head.weight.taken
    return out


def quantized_tree(text, head, quant):
    """Wrap the included Linear weights of a ``lazy_text_model`` pair (in place) in ``quant``'s view — a
    WeightQuant (round to nearest) or an imported checkpoint's own format; returns (text, head)."""
    if quant is None:
        return text, head
    if "llm" in quant.include:
        for layer in text.layers:
            for path in LINEARS:
                linear = linear_at(layer, path)
                linear._children["weight"] = quant.tensor(linear)
    if "lm_head" in quant.include:
        head._children["weight"] = quant.tensor(head)
    return text, head


def quantized_vision(tree, quant: WeightQuant) -> dict[str, "DequantizedTensor"]:
    """Wrap (in place) every Linear weight of a ``lazy_vision_tower`` tree — the blocks' attention and MLP, the
    merger's MLP; not the patch embedding (a convolution) nor the norms — in ``quant``'s view; returns them by
    their name in the tower (``blocks.0.attn.qkv.weight``)."""
    out: dict[str, DequantizedTensor] = {}

    def walk(node, prefix: str) -> None:
        for key, child in list(node._children.items()):
            name = f"{prefix}{key}"
            if hasattr(child, "_children"):
                walk(child, name + ".")
            elif key == "weight" and len(child.shape) == 2 and not name.startswith(NOT_LINEAR):
                node._children[key] = out[name] = DequantizedTensor(child, quant)

    walk(tree, "")
    return out


def vision_graph_name(name: str) -> str:
    """A tower Linear's weight name in transformers → its initializer in the visual graph (the deployment modules
    keep transformers' names; ``PatchMerger`` calls the merger's ``mlp.0``/``mlp.2`` ``fc1``/``fc2``)."""
    return name.replace("merger.mlp.0.", "merger.fc1.").replace("merger.mlp.2.", "merger.fc2.") + "_t"
