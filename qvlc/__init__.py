"""qvlc: compile Qwen2-VL checkpoints into statically shaped, numerically proven ONNX artifacts."""

__version__ = "0.1.0"
