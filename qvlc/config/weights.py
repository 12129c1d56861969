"""``export.weights``: the typed section and its checks on the YAML alone (docs/quantization.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum

from qvlc.artifact.layout import Part
from qvlc.config.choices import OracleKind
from qvlc.errors import ConfigError
from qvlc.precision import WeightFormat


class QuantMethod(str, Enum):
    RTN = "rtn"  # round to nearest
    GPTQ = "gptq"  # calibrated on a text set (qvlc.export.calibrate)

    def __str__(self) -> str:
        return self.value


class Dequantize(str, Enum):
    BLOCKED = "blocked"  # int4: INT4 initializers, opset-21 blocked DequantizeLinear
    EXPLICIT = "explicit"  # int4: the same values one per byte, Cast/Sub/Mul/Reshape (compilers without blocked DQ)

    def __str__(self) -> str:
        return self.value


@dataclass(frozen=True)
class CalibrationConfig:
    path: str = ""  # JSON/JSONL of texts or input_ids (method gptq); empty: the built-in set
    nsamples: int = 128
    seqlen: int = 512


@dataclass(frozen=True)
class WeightsConfig:
    format: WeightFormat = WeightFormat.NONE  # int8 | int4; none: weights stay in export.dtype
    group_size: int = 128  # int4: input rows per scale (int8 is per output channel)
    symmetric: bool = True  # signed integers, no zero point; false: unsigned with a zero point
    method: QuantMethod = QuantMethod.RTN
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    include: tuple[str, ...] = ("llm",)  # llm (decoder linears), lm_head, visual (the tower's linears)
    dequantize: Dequantize = Dequantize.BLOCKED
    min_cosine: float = 0.0  # floor of each output's cosine against the unquantized model; 0: the format's default

    @property
    def enabled(self) -> bool:
        return self.format != WeightFormat.NONE


INCLUDE = ("llm", "lm_head", "visual")
PART_INCLUDE = {"llm": ("llm", "lm_head"), "visual": ("visual",)}  # what each part's graphs hold


def weights_opset(w: "WeightsConfig") -> int:
    """The lowest opset that expresses these weights: DequantizeLinear with fp16 scales needs 19, INT4 blocks 21."""
    if w.format == WeightFormat.NONE:
        return 18
    return 21 if w.format == WeightFormat.INT4 and w.dequantize == "blocked" else 19


def check_weights(cfg) -> None:
    """export.weights on the YAML alone (the group size against the model: config_checks)."""
    w, key = cfg.export.weights, "export.weights"
    if not w.enabled:
        return
    bad = [i for i in w.include if i not in INCLUDE]
    if bad or not w.include:
        raise ConfigError(f"include {list(w.include)}: {'unknown ' + repr(bad[0]) if bad else 'empty'}",
                          fix=f"list some of {', '.join(INCLUDE)}", key=f"{key}.include")
    mine = [i for i in w.include if i in PART_INCLUDE[str(cfg.part)]]
    if not mine:  # one weights block may serve both parts' configs, but it must quantize something of this one
        raise ConfigError(f"include {list(w.include)} quantizes nothing of the {cfg.part} part",
                          fix=f"add {' or '.join(PART_INCLUDE[str(cfg.part)])} to {key}.include",
                          key=f"{key}.include")
    if cfg.part != Part.LLM and w.method == QuantMethod.GPTQ:
        raise ConfigError("method gptq calibrates the LLM on texts; the vision tower is quantized round to nearest",
                          fix=f"use {key}.method: rtn in the visual config", key=f"{key}.method")
    c = w.calibration
    if w.method != "gptq" and c != CalibrationConfig():  # read by method gptq only: never silently unused
        raise ConfigError("calibration applies to method gptq; rtn (round to nearest) needs no data",
                          fix=f"set {key}.method: gptq, or remove {key}.calibration", key=f"{key}.calibration")
    for name, value, lo, hi in (("nsamples", c.nsamples, 1, 4096), ("seqlen", c.seqlen, 16, 32768)):
        if not lo <= value <= hi:
            raise ConfigError(f"{name} {value} is not in [{lo}, {hi}]", fix=f"e.g. {key}.calibration.{name}: "
                              f"{getattr(CalibrationConfig(), name)}", key=f"{key}.calibration.{name}")
    if w.format == WeightFormat.INT4 and (w.group_size <= 0 or w.group_size % 16):
        raise ConfigError(f"{w.group_size} is not a positive multiple of 16", fix=f"use {key}.group_size: 128 "
                          "(or 64, 32: smaller groups, smaller error, more scales)", key=f"{key}.group_size")
    needed = weights_opset(w)
    if 0 < cfg.export.opset < needed:  # only an opset the user set is refused; 0 resolves to `needed`
        raise ConfigError(f"{w.format} weights{' with blocked dequantization' if needed == 21 else ''} need opset "
                          f">= {needed} (DequantizeLinear with {'INT4 blocks' if needed == 21 else 'fp16 scales'}); "
                          f"this compile asks for {cfg.export.opset}", fix=f"set export.opset: {max(needed, 21)}",
                          key="export.opset")
    if not 0.0 <= w.min_cosine < 1.0:
        raise ConfigError(f"min_cosine {w.min_cosine} is not in [0, 1)", fix=f"e.g. {key}.min_cosine: "
                          f"{w.format.min_cosine} (0: the format's default)", key=f"{key}.min_cosine")
    if w.format == WeightFormat.INT4 and w.dequantize == "blocked" and "tvm" in cfg.validate.runtimes:
        raise ConfigError("tvm is in validate.runtimes, and TVM 0.27 does not import blocked int4 DequantizeLinear",
                          fix=f"set {key}.dequantize: explicit (the same integers, plain ops), or remove tvm",
                          key=f"{key}.dequantize")
    if cfg.validate.enabled and cfg.validate.oracle == OracleKind.MEMORY:
        raise ConfigError("quantized weights are proven with the streamed oracle (it reads the dequantized weights "
                          "layer by layer)", fix="remove validate.oracle: memory", key="validate.oracle")
    if cfg.export.fp32_layers:
        raise ConfigError("fp32 islands and quantized weights together are not supported yet",
                          fix=f"remove export.fp32_layers or {key}", key="export.fp32_layers")
