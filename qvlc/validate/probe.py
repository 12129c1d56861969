"""``export.fp32_layers: auto``: the fp16 range check run before the export, so the graphs can keep what it flags
in fp32.

The oracle runs the validation cases once more (the LLM's prompts without a continuation — the graphs have not
generated anything yet; the visual cases as validation builds them) with the range recorder on. Every module it
flags (overflow, near the fp16 maximum, or underflow) becomes an fp32 island, and the residual stream is carried
in fp32 from the first flagged layer. Validation then records the ranges again with the generated tokens: a
hazard the probe did not see is reported (and fails an fp16 compile) like any other.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from qvlc.artifact.layout import Part
from qvlc.checkpoint.hf_model import LoadedCheckpoint
from qvlc.models.common.islands import Islands, islands, part_units
from qvlc.validate.ranges import RESIDUAL, RangeRecorder

if TYPE_CHECKING:
    # the stages' argument, named in annotations only: compile/ drives export and validation
    from qvlc.compile.plan import Plan


def probe_islands(plan: Plan, ck: LoadedCheckpoint | None) -> Islands:
    """The islands the range check asks for on this plan's validation cases (``ck``: the in-memory oracle)."""
    ranges = probe_ranges(plan, ck)
    found = ranges.hazards()
    modules = [h.module for h in found if h.kind != RESIDUAL or h.module.endswith("patch_embed")]
    residual = tuple(h.module for h in found if h.kind == RESIDUAL)
    return islands(modules, part_units(plan.cfg.part, plan.dims), residual)


def probe_ranges(plan: Plan, ck: LoadedCheckpoint | None) -> RangeRecorder:
    if plan.cfg.part == Part.LLM:
        from qvlc.validate.llm import llm_cases, oracle_input
        from qvlc.validate.oracle import InMemoryOracle, StreamedOracle

        tokens = plan.dims.tokens
        inputs = [oracle_input(c, [], tokens.image, tokens.video) for c in llm_cases(plan, ck)]
        oracle = InMemoryOracle(plan.family, ck.model, plan.dims) if ck is not None else \
            StreamedOracle(plan.family, plan.checkpoint, plan.dims)
        ranges = RangeRecorder()
        oracle.run(inputs, ranges)
        return ranges
    from qvlc.validate.visual import reference_embeddings, visual_cases

    ranges = RangeRecorder(attn_name="attn")
    reference_embeddings(plan, ck, visual_cases(plan), ranges)
    return ranges
