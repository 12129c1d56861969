"""The documentation stays true where a test can tell: the README is a front door (<= 250 lines), every relative link
in README.md, CHANGELOG.md and docs/ resolves (files, and #anchors to headings), and every key of the native
config schema is documented in docs/configuration.md."""

from __future__ import annotations

import dataclasses
import re
import typing
from pathlib import Path

import pytest

from qvlc.config.schema import Config
from qvlc.config.yaml_to_dataclass import HIDDEN_FIELDS

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def anchors(page: Path) -> set[str]:
    """GitHub's heading anchors: lower case, punctuation dropped, spaces to hyphens."""
    out = set()
    for line in page.read_text().splitlines():
        if m := re.match(r"#+ (.*)", line):
            text = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower())
            out.add(text.replace(" ", "-"))
    return out


def test_readme_is_a_front_door():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 250, f"README.md has {len(lines)} lines: move reference material to docs/"
    assert (ROOT / "docs").is_dir() and len(PAGES) >= 10


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):  # http(s), mailto: not ours to check offline
            continue
        path, _, anchor = target.partition("#")
        dest = (page.parent / path).resolve() if path else page
        if not dest.exists():
            broken.append(f"{target} (no such file)")
        elif anchor and dest.suffix == ".md" and anchor not in anchors(dest):
            broken.append(f"{target} (no heading #{anchor} in {dest.name})")
    assert not broken, f"{page.name}: {broken}"


def _keys(cls, prefix: str = "") -> list[str]:
    hints = typing.get_type_hints(cls)
    out = []
    for f in dataclasses.fields(cls):
        if not f.init or f.name in HIDDEN_FIELDS:
            continue
        kind = hints[f.name]
        sub = next((a for a in (kind, *typing.get_args(kind)) if dataclasses.is_dataclass(a)), None)
        out.extend(_keys(sub, f"{prefix}{f.name}.") if sub else [f"{prefix}{f.name}"])
    return out


def test_every_config_key_is_documented():
    doc = (ROOT / "docs" / "configuration.md").read_text()
    keys = _keys(Config)
    assert "export.weights.calibration.seqlen" in keys and "validate.runtimes" in keys  # the walk sees the tree
    missing = [k for k in keys if not re.search(rf"^\s*{re.escape(k.rsplit('.', 1)[-1])}:", doc, re.M)]
    assert not missing, f"config keys not documented in docs/configuration.md: {missing}"
