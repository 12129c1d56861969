"""Weight formats: round to nearest, GPTQ (algorithm and store), imported GPTQ/AWQ. No family, no exporter."""
