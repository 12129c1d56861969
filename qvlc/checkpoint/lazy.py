"""Read slices of checkpoint weights straight from safetensors, without loading the model.

A tensor-parallel rank needs 1/tp of most weights. ``lazy_text_model(folder)`` returns an object shaped like
transformers' text model (``.layers[i].self_attn.q_proj.weight``, ``.norm.weight``) plus ``lm_head``, whose
tensors are read only when the deployment module narrows them to its slice — so exporting a rank in a worker
process never materialises the full model.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from qvlc.checkpoint.load import INDEX_NAME, SINGLE_NAME, index_weight_map

# transformers >= 4.52 names the text model model.language_model.*; released checkpoints use model.*
TEXT_PREFIXES = ("model.language_model.", "model.")


class LazyTensor:
    """One checkpoint tensor; ``narrow`` reads just that slice from disk."""

    def __init__(self, folder: Path, file: str, name: str) -> None:
        self.folder, self.file, self.name = folder, file, name
        with safe_open(str(folder / file), framework="pt") as f:
            self.shape = torch.Size(f.get_slice(name).get_shape())

    def detach(self) -> "LazyTensor":
        return self

    def narrow(self, dim: int, start: int, length: int) -> torch.Tensor:
        index = [slice(None)] * len(self.shape)
        index[dim] = slice(start, start + length)
        with safe_open(str(self.folder / self.file), framework="pt") as f:
            return f.get_slice(self.name)[tuple(index)]


class LazyRows:
    """Row blocks of a 2-D LazyTensor as float32 NumPy (``rows[a:b]``), for streaming a table to disk."""

    def __init__(self, t: LazyTensor) -> None:
        self.t = t
        self.shape = tuple(t.shape)

    def __getitem__(self, rows: slice):
        start, stop, _ = rows.indices(self.shape[0])
        return self.t.narrow(0, start, stop - start).float().numpy()


class Tree:
    """Attribute/index access over dotted weight names: tree.layers[0].mlp.up_proj.weight."""

    def __init__(self) -> None:
        self._children: dict[str, object] = {}

    def _insert(self, parts: list[str], leaf: LazyTensor) -> None:
        head, rest = parts[0], parts[1:]
        if not rest:
            self._children[head] = leaf
            return
        child = self._children.setdefault(head, Tree())
        child._insert(rest, leaf)  # type: ignore[union-attr]

    def __getattr__(self, name: str):
        try:
            return self.__dict__["_children"][name]
        except KeyError:
            raise AttributeError(name) from None

    def __getitem__(self, i: int):
        return self._children[str(i)]

    def __iter__(self):
        return iter(self._children[k] for k in sorted(self._children, key=int))

    def __len__(self) -> int:
        return len(self._children)


def _weight_map(folder: Path) -> dict[str, str]:
    index = folder / INDEX_NAME
    if index.is_file():
        return index_weight_map(index)
    with safe_open(str(folder / SINGLE_NAME), framework="pt") as f:
        return {k: SINGLE_NAME for k in f.keys()}


def lazy_text_model(folder: Path) -> tuple[Tree, Tree]:
    """(text_model, lm_head) trees over the checkpoint in ``folder``; lm_head falls back to the tied embedding."""
    folder = Path(folder)
    weights = _weight_map(folder)
    prefix = next(p for p in TEXT_PREFIXES if f"{p}embed_tokens.weight" in weights)
    text, head = Tree(), Tree()
    for name, file in weights.items():
        if name.startswith(prefix) and not name.startswith(("model.visual.", "model.language_model.visual")):
            text._insert(name[len(prefix):].split("."), LazyTensor(folder, file, name))
    head_name = "lm_head.weight" if "lm_head.weight" in weights else f"{prefix}embed_tokens.weight"
    head._insert(["weight"], LazyTensor(folder, weights[head_name], head_name))
    return text, head


def lazy_vision_tower(folder: Path) -> Tree:
    """The vision tower's tensors (``visual.*`` or ``model.visual.*``) as a tree, read only when narrowed."""
    folder = Path(folder)
    tree = Tree()
    for name, file in _weight_map(folder).items():
        for prefix in ("visual.", "model.visual."):
            if name.startswith(prefix):
                tree._insert(name[len(prefix):].split("."), LazyTensor(folder, file, name))
    return tree


def read_float(tree, name: str) -> torch.Tensor:
    """The whole tensor at dotted ``name`` under ``tree`` (``layers.0.mlp.up_proj.weight``), read as fp32."""
    node = tree
    for part in name.split("."):
        node = getattr(node, part)
    return node.narrow(0, 0, node.shape[0]).float()


def fill(module: torch.nn.Module, tree) -> torch.nn.Module:
    """Copy every parameter of ``module`` (allocated, e.g. by ``to_empty``) from the same name under ``tree``."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            p.copy_(read_float(tree, name))
    return module


def materialize(cls, *args, tree) -> torch.nn.Module:
    """``cls(*args)`` built on the meta device (no memory, no init), then given the weights under ``tree`` in
    fp32: a transformers module with a checkpoint's weights, one at a time (the streamed oracles)."""
    with torch.device("meta"):
        module = cls(*args)
    return fill(module.to_empty(device="cpu").eval(), tree)
