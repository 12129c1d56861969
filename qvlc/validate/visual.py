"""Parity of the visual graph (being built: issue 3)."""

from __future__ import annotations


def validate_visual(plan, ck, stage, report):
    raise NotImplementedError
