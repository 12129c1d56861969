"""``validate.cases``: the validation cases of each part, and the check of a config's choice."""

from __future__ import annotations

from enum import Enum

from qvlc.artifact.layout import Part
from qvlc.errors import ConfigError


class Case(str, Enum):
    """A validation case: the LLM part's prompts and the visual part's image/video grids (``validate.cases``)."""

    ALL = "all"
    TEXT_SHORT = "text_short"
    ONE_IMAGE_HALF = "one_image_half"
    TWO_IMAGES_FULL = "two_images_full"
    IMAGE_AND_VIDEO = "image_and_video"
    SMALL_IMAGE = "small_image"
    ODD_GRID = "odd_grid"
    EXTREME_ASPECT = "extreme_aspect"
    TWO_IMAGES = "two_images"
    VIDEO_T2 = "video_t2"
    HEAVY_PADDING = "heavy_padding"
    CHUNK_SHORT = "chunk_short"
    CHUNKS_EXACT = "chunks_exact"
    IMAGE_ACROSS_CHUNKS = "image_across_chunks"


LLM_CASES = (Case.TEXT_SHORT, Case.ONE_IMAGE_HALF, Case.TWO_IMAGES_FULL, Case.IMAGE_AND_VIDEO)
# with export.prefill_chunk T: shorter than one chunk, exactly 2T, several chunks with an image across a boundary
CHUNK_CASES = (Case.CHUNK_SHORT, Case.CHUNKS_EXACT, Case.IMAGE_ACROSS_CHUNKS)
VISUAL_CASES = (Case.SMALL_IMAGE, Case.ODD_GRID, Case.EXTREME_ASPECT, Case.TWO_IMAGES, Case.VIDEO_T2,
                Case.HEAVY_PADDING)


def part_cases(part: str, chunked: bool = False) -> tuple[Case, ...]:
    """The part's cases; the LLM part's chunk cases only when it has a chunk graph (``export.prefill_chunk``)."""
    return (LLM_CASES + (CHUNK_CASES if chunked else ())) if part == Part.LLM else VISUAL_CASES


def chosen(cases: tuple[Case, ...], part: str, chunked: bool = False) -> tuple[list[str], list[str]]:
    """(the part's cases that run, the ones skipped), in the part's order."""
    run = [c.value for c in part_cases(part, chunked) if Case.ALL in cases or c in cases]
    return run, [c.value for c in part_cases(part, chunked) if c.value not in run]


def check_cases(cases: tuple[Case, ...], part: str, chunked: bool = False) -> None:
    key, names = "validate.cases", part_cases(part, chunked)
    if not chunked and (named := [c.value for c in cases if c in CHUNK_CASES]):
        raise ConfigError(f"{', '.join(named)}: chunk {'case' if len(named) == 1 else 'cases'} without a chunk graph",
                          fix="set export.prefill_chunk, or choose other cases", key=key)
    if Case.ALL in cases and len(cases) > 1:
        raise ConfigError("all cannot be combined with case names", fix=f"write {key}: all, or only names", key=key)
    if len(set(cases)) != len(cases):
        raise ConfigError("a case is listed twice", fix=f"list each case once in {key}", key=key)
    if Case.ALL not in cases and (other := [c.value for c in cases if c not in names]):
        raise ConfigError(f"{', '.join(other)} {'is not a case' if len(other) == 1 else 'are not cases'} of the "
                          f"{part} part", fix=f"choose from all, {', '.join(c.value for c in names)}", key=key)
