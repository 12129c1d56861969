"""A config file read: UTF-8 YAML without aliases or duplicate keys, native or vamc layout, into the typed tree,
with every check on the YAML alone (``qvlc.config.value_checks``)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import yaml

from qvlc.artifact.layout import Part
from qvlc.config.schema import Config
from qvlc.config.value_checks import check_values
from qvlc.config.vamc import from_vamc
from qvlc.config.yaml_to_dataclass import build
from qvlc.errors import ConfigError, printable, quoted


def config_from_dict(raw: dict[str, Any]) -> Config:
    if not isinstance(raw, dict):
        raise ConfigError("the config file must be a YAML mapping", fix="start with `name:` and `part:` lines")
    ignored: tuple[str, ...] = ()
    declared: dict[str, Any] = {}
    if "frontend" in raw:
        raw = from_vamc(raw)
        ignored = raw.pop("ignored")
        declared = {k: raw.pop(k) for k in ("declared_patch_dim", "declared_fullatt_blocks") if k in raw}
    cfg: Config = build(Config, raw, "")
    # For the LLM part, an explicit export.max_patches says how many patches the visual graph feeding it holds.
    explicit_patches = cfg.part == Part.LLM and "max_patches" in (raw.get("export") or {})
    cfg = replace(cfg, ignored=ignored, llm_holds_patches=cfg.export.max_patches if explicit_patches else 0,
                  **declared)
    check_values(cfg)
    return cfg


class _StrictLoader(yaml.SafeLoader):
    """YAML that refuses a key given twice in one mapping (PyYAML would silently keep the last one), and aliases
    (``*name``): a few hundred bytes of nested aliases expand to gigabytes (a "billion laughs" config)."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise ConfigError(f"line {event.start_mark.line + 1}: YAML aliases (*{printable(event.anchor, 40)}) are "
                              "not allowed in qvlc configs", fix="write the value out where the alias stands",
                              key="CONFIG")
        return super().compose_node(parent, index)

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise ConfigError(f"key {quoted(key)} appears twice in one block (line "
                                  f"{key_node.start_mark.line + 1}); YAML would silently keep only the last",
                                  fix=f"merge the two {quoted(key)} blocks into one",
                                  key=str(key))
            seen.add(key)
        return super().construct_mapping(node, deep)


MAX_CONFIG_BYTES = 1 << 20


def load_config(path: str | Path) -> Config:
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{str(path)!r} is a folder, not a config file", fix="pass the path of a YAML config file",
                          key="CONFIG")
    if path.is_file() and path.stat().st_size > MAX_CONFIG_BYTES:
        raise ConfigError(f"{printable(path, 200)} is {path.stat().st_size} bytes; a config is at most "
                          f"{MAX_CONFIG_BYTES}", fix="pass a qvlc config (a few dozen lines of YAML)", key="CONFIG")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise ConfigError(f"config file {str(path)!r} not found", fix="pass the path of a YAML config",
                          key="CONFIG") from exc
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{str(path)!r} is not UTF-8 text ({exc.reason} at byte {exc.start})",
                          fix="save the config as UTF-8 YAML", key="CONFIG") from exc
    try:
        raw = yaml.load(text, Loader=_StrictLoader)  # noqa: S506 — a SafeLoader subclass
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path} is not valid YAML: {exc}", fix="fix the YAML syntax", key="CONFIG") from exc
    return config_from_dict(raw)
