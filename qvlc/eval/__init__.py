"""`qvlc eval`: benchmark files (``bench_data``), VLMEvalKit's prompts and answer extraction (``scoring``), the run
and results.json (``evaluate``), and the original transformers model as a reference (``reference``)."""
