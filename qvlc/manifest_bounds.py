"""The numbers a manifest may hold, checked when it is read and before any of them sizes work (rank paths,
buffers, loops): a resealed manifest with ``tp: 3000000`` once made `run` build millions of rank paths."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from qvlc.contract import Manifest

# Numbers a manifest may hold, checked before any of them sizes work (rank paths, buffers, loops).
BOUNDS = {"tp": 64, "prefill_len": 1 << 20, "max_context": 1 << 20, "hidden": 1 << 17, "layers": 1024,
          "head_dim": 4096, "kv_heads_per_rank": 1024, "vocab": 1 << 22, "max_patches": 1 << 20, "patch_dim": 1 << 16,
          "merge_size": 16, "out_hidden": 1 << 17, "window": 1 << 10}


def bound_problems(m: "Manifest") -> list[str]:
    """Each spec number outside 1..its bound (window may be 0), and more than 100000 files or 1024 chunks."""
    problems = []
    for section in (m.llm, m.visual):
        for name, limit in BOUNDS.items():
            value = getattr(section, name, None)
            if value is not None and not (0 if name == "window" else 1) <= value <= limit:
                problems.append(f"{name} is {value}, outside 1..{limit}")
    if m.visual is not None and not 1 <= len(m.visual.chunk_widths) <= 1024:
        problems.append(f"{len(m.visual.chunk_widths)} chunk widths")
    if len(m.files) > 100_000:
        problems.append(f"{len(m.files)} files listed")
    return problems
