"""qvlc: compile Qwen2-VL-family checkpoints into statically shaped, numerically proven ONNX artifacts."""

__version__ = "0.3.0"
