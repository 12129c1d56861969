"""Serving compiled artifacts: the OpenAI-compatible server (`qvlc serve`) and benchmark scoring (`qvlc eval`).

Imports the runtime, never the compiler. FastAPI and uvicorn are the optional extra ``qvlc[serve]``.
"""
