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


LLM_CASES = (Case.TEXT_SHORT, Case.ONE_IMAGE_HALF, Case.TWO_IMAGES_FULL, Case.IMAGE_AND_VIDEO)
VISUAL_CASES = (Case.SMALL_IMAGE, Case.ODD_GRID, Case.EXTREME_ASPECT, Case.TWO_IMAGES, Case.VIDEO_T2,
                Case.HEAVY_PADDING)


def part_cases(part: str) -> tuple[Case, ...]:
    return LLM_CASES if part == Part.LLM else VISUAL_CASES


def chosen(cases: tuple[Case, ...], part: str) -> tuple[list[str], list[str]]:
    """(the part's cases that run, the ones skipped), in the part's order."""
    run = [c.value for c in part_cases(part) if Case.ALL in cases or c in cases]
    return run, [c.value for c in part_cases(part) if c.value not in run]


def check_cases(cases: tuple[Case, ...], part: str) -> None:
    key, names = "validate.cases", part_cases(part)
    if Case.ALL in cases and len(cases) > 1:
        raise ConfigError("all cannot be combined with case names", fix=f"write {key}: all, or only names", key=key)
    if len(set(cases)) != len(cases):
        raise ConfigError("a case is listed twice", fix=f"list each case once in {key}", key=key)
    if Case.ALL not in cases and (other := [c.value for c in cases if c not in names]):
        raise ConfigError(f"{', '.join(other)} {'is not a case' if len(other) == 1 else 'are not cases'} of the "
                          f"{part} part", fix=f"choose from all, {', '.join(c.value for c in names)}", key=key)
