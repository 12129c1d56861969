"""Reading checkpoints: config.json and safetensors checks, lazy weight views, the tokenizer, the tiny defaults."""
