"""Layers every family's deployment modules are built from. Each holds the Hugging Face parameters themselves
(views; converted only when the export dtype differs), never a copy of a whole model."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def param(t, dtype: torch.dtype, shape: tuple[int, ...] | None = None) -> nn.Parameter:
    """A Hugging Face parameter (optionally reshaped as a view): no copy unless the dtype differs."""
    t = t.detach()
    if shape is not None:
        t = t.view(shape)
    return nn.Parameter(t.to(dtype), requires_grad=False)


def take(t, dim: int, start: int, length: int, dtype: torch.dtype) -> nn.Parameter:
    """A slice of a Hugging Face parameter: a view when no dtype conversion is needed, never a full copy.
    ``t`` may also be a ``lazy.LazyTensor``, which reads only the slice from the checkpoint file."""
    return nn.Parameter(t.detach().narrow(dim, start, length).to(dtype), requires_grad=False)


class Linear(nn.Module):
    """y = x @ weight_t + bias, with ``weight_t`` the transposed view [in, out] of the HF weight [out, in].

    Holding the transpose as the parameter gives the graph a plain MatMul on a named initializer
    (``…q_proj.weight_t``); with F.linear the exporter folds the transpose into an anonymous ``val_N`` copy.
    """

    def __init__(self, weight: nn.Parameter, bias: nn.Parameter | None = None) -> None:
        super().__init__()
        self.weight_t = nn.Parameter(weight.detach().t(), requires_grad=False)
        self.bias = bias

    @classmethod
    def of(cls, hf: nn.Linear, dtype: torch.dtype) -> "Linear":
        """The whole of a Hugging Face Linear."""
        return cls(param(hf.weight, dtype), None if hf.bias is None else param(hf.bias, dtype))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.matmul(x, self.weight_t)
        return y if self.bias is None else y + self.bias


class RMSNorm(nn.Module):
    """Qwen2RMSNorm: normalise in fp32, scale in the activation dtype."""

    def __init__(self, weight: nn.Parameter, eps: float, dtype: torch.dtype) -> None:
        super().__init__()
        self.weight = take(weight, 0, 0, weight.shape[0], dtype)  # also reads a lazy checkpoint tensor
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


class LayerNorm(nn.Module):
    """LayerNorm computed in fp32 (parameters kept fp32: they are small), result in the activation dtype."""

    def __init__(self, hf: nn.LayerNorm) -> None:
        super().__init__()
        self.weight = param(hf.weight, torch.float32)
        self.bias = param(hf.bias, torch.float32)
        self.eps = float(hf.eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), self.weight.shape, self.weight, self.bias, self.eps).to(x.dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu": lambda x: F.gelu(x), "silu": F.silu,
               "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh")}
