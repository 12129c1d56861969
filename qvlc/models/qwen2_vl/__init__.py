"""Everything that knows Qwen2-VL: dims, checkpoint loading, deployment modules, the tiny default."""
