"""The config against the checkpoint's config.json and this machine, still before any weight is read: tp against
the heads, lengths against the model's position limit, declared vamc values against the checkpoint, fp32 islands
and weight groups against the model's modules."""

from __future__ import annotations

from typing import TYPE_CHECKING

from qvlc.config.choices import OracleKind
from qvlc.config.schema import Config, Part
from qvlc.config.yaml_to_dataclass import AUTO
from qvlc.errors import ConfigError, quoted
from qvlc.models.common.islands import part_units, unmatched
from qvlc.models.common.tp import tp_problems, valid_tp_values

if TYPE_CHECKING:
    from qvlc.models.common.dims import ModelDims
    from qvlc.models.common.family import Family


def check_against_model(cfg: Config, dims: "ModelDims", family: "Family") -> None:
    """Every check that needs config.json (the memory estimate against this machine is the plan's:
    ``qvlc.compile.memory_estimate``)."""
    _tp(cfg, dims)
    _lengths(cfg, dims, family)
    _declared(cfg, dims)
    _fp32_layers(cfg, dims)
    _weight_groups(cfg, dims)


def _tp(cfg: Config, dims: "ModelDims") -> None:
    t = dims.text
    if cfg.part == Part.LLM and cfg.export.tp > 1:
        problems = tp_problems(cfg.export.tp, t.heads, t.kv_heads, t.intermediate, t.vocab)
        if problems:
            valid = valid_tp_values(t.heads, t.kv_heads, t.intermediate, t.vocab)
            raise ConfigError(f"tp {cfg.export.tp} cannot split this model: {'; '.join(problems)}",
                              fix=f"use one of tp = {', '.join(map(str, valid))}", key="export.tp")


def _lengths(cfg: Config, dims: "ModelDims", family: "Family") -> None:
    e, limit = cfg.export, dims.text.max_positions
    if cfg.part == Part.LLM:
        for key, value in (("export.max_context", e.max_context), ("export.prefill_len", e.prefill_len)):
            if value > limit:
                raise ConfigError(f"{value} is beyond the checkpoint's max_position_embeddings {limit}",
                                  fix=f"use {key.split('.')[1]} <= {limit // 16 * 16}", key=key)
    if cfg.part == Part.LLM and cfg.llm_holds_patches:
        wrap = family.vision_wrap_tokens  # vision start/end around the merged image tokens
        need = cfg.llm_holds_patches // dims.vision.merge_unit + wrap
        if e.prefill_len < need:
            raise ConfigError(
                f"prefill_len {e.prefill_len} cannot hold the {need - wrap} visual tokens of "
                f"max_patches {cfg.llm_holds_patches} (plus {wrap} around them)",
                fix=f"raise export.prefill_len to at least {-(-need // 16) * 16}, or lower export.max_patches",
                key="export.prefill_len")
    if cfg.part == Part.VISUAL and e.max_patches % dims.vision.merge_unit:
        v = dims.vision
        raise ConfigError(f"max_patches {e.max_patches} is not a multiple of the merge unit {v.merge_unit}",
                          fix=f"use a multiple of {16 * v.merge_unit // 4}", key="export.max_patches")


def _fp32_layers(cfg: Config, dims: "ModelDims") -> None:
    patterns = cfg.export.fp32_layers
    if not patterns or patterns == (AUTO,):
        return
    units = part_units(cfg.part, dims)
    bad = unmatched(patterns, units)
    if bad:
        raise ConfigError(f"{', '.join(map(repr, bad))} names no module of the {cfg.part} part",
                          fix=f"use transformers' module names as the parity report's fp16 ranges give them, e.g. "
                              f"{quoted(units[1])}, {units[-2]!r} or a pattern such as {units[1].rsplit('.', 2)[0]}.*.mlp",
                          key="export.fp32_layers")


def group_inputs(t, tp: int) -> dict[str, int]:
    """The input size each quantized Linear of one rank has (int4 groups run along it)."""
    return {"q/k/v, gate/up and lm_head (hidden)": t.hidden,
            "o_proj (heads x head_dim / tp)": t.heads // tp * t.head_dim,
            "down_proj (intermediate / tp)": t.intermediate // tp}


def imported_opset(imported, cfg: Config) -> int:
    """The lowest opset that expresses a GPTQ/AWQ checkpoint's integers: in groups (blocked) 21, per channel 19."""
    return 21 if imported.group_size != -1 and cfg.export.weights.dequantize == "blocked" else 19


def check_imported(cfg: Config, dims: "ModelDims", imported) -> None:
    """A checkpoint that is already quantized (GPTQ/AWQ): its integers are used as they are."""
    if cfg.export.weights.enabled:
        raise ConfigError(f"the checkpoint is already quantized ({imported.method} int{imported.bits}, groups of "
                          f"{imported.group_size}): its integers are compiled as they are", fix="remove "
                          "export.weights (or point model.checkpoint at the unquantized model)",
                          key="export.weights.format")
    if cfg.part == Part.LLM and cfg.validate.enabled and cfg.validate.oracle == OracleKind.MEMORY:
        raise ConfigError("a quantized checkpoint is proven with the streamed oracle (transformers cannot load it "
                          "without a GPTQ/AWQ kernel package)", fix="remove validate.oracle: memory",
                          key="validate.oracle")
    if cfg.part != Part.LLM:
        return
    blocked = imported.group_size != -1 and cfg.export.weights.dequantize == "blocked"
    if blocked and imported.bits == 4 and "tvm" in cfg.validate.runtimes:
        raise ConfigError("tvm is in validate.runtimes, and TVM 0.27 does not import blocked int4 DequantizeLinear",
                          fix="set export.weights.dequantize: explicit, or remove tvm", key="export.weights.dequantize")
    needed = imported_opset(imported, cfg)
    if 0 < cfg.export.opset < needed:  # only an opset the user set is refused; 0 resolves to `needed`
        raise ConfigError(f"the checkpoint's {imported.method} weights need opset >= {needed} (DequantizeLinear "
                          f"{'in blocks' if blocked else 'with fp16 scales'}); this compile asks for "
                          f"{cfg.export.opset}", fix="set export.opset: 21", key="export.opset")
    if imported.group_size != -1:
        _groups_fit(imported.group_size, dims, cfg.export.tp, "export.tp", "the checkpoint's group_size")


def _weight_groups(cfg: Config, dims: "ModelDims") -> None:
    w = cfg.export.weights
    if cfg.part == Part.LLM and w.format == "int4":
        _groups_fit(w.group_size, dims, cfg.export.tp, "export.weights.group_size", "group_size")
    if cfg.part == Part.VISUAL and w.format == "int4":  # the tower's Linears take these input sizes
        v = dims.vision
        ins = {"attention": v.embed_dim, "MLP down projection": v.mlp_hidden, "merger": v.embed_dim * v.merge_unit}
        misfit = _misfit(ins, w.group_size, v.embed_dim)
        if misfit:
            name, n, groups = misfit
            raise ConfigError(f"group_size {w.group_size} does not divide the {n} input rows of the vision tower's "
                              f"{name}", fix=f"use group_size {', '.join(map(str, groups[-6:]))}" if groups else
                              "no int4 group size fits this tower: use format int8 (per output channel)",
                              key="export.weights.group_size")


def _misfit(inputs: dict[str, int], group: int, upto: int) -> tuple[str, int, list[int]] | None:
    """None when ``group`` tiles every one of ``inputs`` (name → input rows); otherwise the first it does not tile,
    its rows, and the group sizes (multiples of 16 up to ``upto``) that tile them all."""
    bad = next(((k, n) for k, n in inputs.items() if n % group), None)
    if bad is None:
        return None
    return (*bad, [g for g in range(16, upto + 1, 16) if all(n % g == 0 for n in inputs.values())])


def _groups_fit(group: int, dims: "ModelDims", tp: int, key: str, what: str) -> None:
    """int4 groups of input rows must tile every rank's input slice: a group straddling the o_proj or down_proj
    split would need rows from two ranks."""
    t = dims.text
    misfit = _misfit(group_inputs(t, tp), group, t.hidden)
    if misfit is None:
        return
    name, n, groups = misfit
    tps = [v for v in valid_tp_values(t.heads, t.kv_heads, t.intermediate, t.vocab)
           if all(n % group == 0 for n in group_inputs(t, v).values())]
    fix = f"use group_size {', '.join(map(str, groups[-6:]))}" if groups and what == "group_size" else ""
    if tps:
        fix += f"{', or keep it and ' if fix else ''}use tp = {', '.join(map(str, tps))}"
    raise ConfigError(f"{what} {group} does not divide the {n} input rows of {name} at tp = {tp}",
                      fix=fix or "no tp fits this group size", key=key)


def _declared(cfg: Config, dims: "ModelDims") -> None:
    if cfg.declared_patch_dim and cfg.declared_patch_dim != dims.vision.patch_dim:
        raise ConfigError(f"frontend.shape.pixel_values declares patches of {cfg.declared_patch_dim} values, the "
                          f"checkpoint's are {dims.vision.patch_dim}",
                          fix=f"write frontend.shape.pixel_values: [{cfg.export.max_patches}, {dims.vision.patch_dim}]",
                          key="frontend.shape.pixel_values")
    declared = cfg.declared_fullatt_blocks
    if declared is not None and tuple(declared) != tuple(dims.vision.fullatt_blocks):
        raise ConfigError(f"backend.compile.fullatt_block_indexes is {list(declared)}, but the checkpoint's "
                          f"config.json makes blocks {list(dims.vision.fullatt_blocks)} attend over whole frames",
                          fix=f"write backend.compile.fullatt_block_indexes: {list(dims.vision.fullatt_blocks)} "
                              "(or remove it: qvlc reads it from config.json)",
                          key="backend.compile.fullatt_block_indexes")
