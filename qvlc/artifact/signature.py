"""Graph interfaces: each input and output's name, static shape and dtype, declared once by the model family
(``GraphSig``) and read back from every exported file (``qvlc.artifact.manifest.graph_io``)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class TensorSig:
    """One graph input or output: name, static shape, dtype (NumPy name: float16, float32, int64, bool)."""

    name: str
    shape: tuple[int, ...]
    dtype: str

    def to_dict(self) -> dict:
        return {"name": self.name, "dtype": self.dtype, "shape": list(self.shape)}


@dataclass(frozen=True)
class GraphSig:
    """A graph's interface, declared once by the model family and checked against every exported file."""

    inputs: tuple[TensorSig, ...]
    outputs: tuple[TensorSig, ...]

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)

    def mismatches(self, inputs: tuple[TensorSig, ...], outputs: tuple[TensorSig, ...]) -> list[tuple[str, str]]:
        """(name, problem) for every difference of a graph's actual interface from this one: names, then shapes,
        then dtypes. Empty when they agree."""
        problems: list[tuple[str, str]] = []
        for kind, want, got in (("input", self.inputs, inputs), ("output", self.outputs, outputs)):
            w, g = {t.name: t for t in want}, {t.name: t for t in got}
            problems += [(n, f"missing {kind} (graph has {sorted(g)})") for n in sorted(set(w) - set(g))]
            problems += [(n, f"unexpected {kind} (contract: {sorted(w)})") for n in sorted(set(g) - set(w))]
            for n in [t.name for t in want if t.name in g]:
                a, b = g[n], w[n]
                if (tuple(a.shape), a.dtype) != (tuple(b.shape), b.dtype):
                    problems.append((n, f"{a.dtype} {list(a.shape)} != contract {b.dtype} {list(b.shape)}"))
        return problems
