"""Every input surface qvlc reads, as a property over hostile bytes (hypothesis): configs in both layouts, every
JSON file of a checkpoint and its safetensors header, an artifact's manifest, preprocess.json and parity.json
(edited and resealed, so the digest passes), image and video bytes, `qvlc eval`'s TSV and JSONL, and `qvlc serve`'s
request bodies and headers.

The property, for every example: the command's documented exit code (never 4, "a bug in qvlc") with one message
that names the file or key at fault — for HTTP a 4xx in OpenAI's error shape, never a 5xx — nothing written
outside the folder the example owns, and bounded time. ``tests/fuzz/test_fuzz.py`` runs a bounded number of
examples per surface in CI; ``benchmarks/fuzz.py --minutes N`` runs them long.
"""

from __future__ import annotations

import base64
import copy
import io
import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
import yaml
from hypothesis import strategies as st
from PIL import Image

from qvlc.cli.failures import Exit, guarded

MAX_SECONDS = 30.0  # one example, end to end (a checkpoint's tokenizer load included)
REPO = Path(__file__).resolve().parents[2]

# ---------------------------------------------------------------------------------------------- outcomes


@dataclass
class Outcome:
    code: int
    messages: list[str]
    seconds: float


def outcome(fn: Callable[[], Any]) -> Outcome:
    """``fn`` run as a command body: the exit code and the messages the user would see."""
    messages: list[str] = []
    t0 = time.monotonic()
    code = 0
    try:
        with guarded("fuzz", lambda kind, text: messages.append(f"{kind}: {text}")):
            fn()
    except Exit as e:
        code = e.code
    return Outcome(code, messages, time.monotonic() - t0)


def _traceback_of(message: str) -> str:
    """The log an internal error wrote (its path ends the message's first line), for the failure report."""
    for word in message.split():
        if word.endswith(".log") and Path(word).is_file():
            return Path(word).read_text()[-3000:]
    return ""


def expect(o: Outcome, allowed: set[int], names: tuple[str, ...] = ()) -> None:
    """The property every surface holds."""
    assert o.code != 4, "exit 4 (a bug in qvlc): " + " | ".join(o.messages) + "\n" + _traceback_of(o.messages[0])
    assert o.code in allowed, f"exit {o.code}, expected one of {sorted(allowed)}: {o.messages}"
    assert o.seconds < MAX_SECONDS, f"{o.seconds:.1f} s"
    if o.code:
        assert len(o.messages) == 1, o.messages
        assert not names or any(n in o.messages[0] for n in names), f"names none of {names}: {o.messages[0]}"


def only_files(folder: Path, expected: set[str]) -> None:
    """Nothing written outside what the example owns."""
    found = {p.relative_to(folder).as_posix() for p in folder.rglob("*")}
    assert found <= expected, f"written: {sorted(found - expected)}"


# ---------------------------------------------------------------------------------------------- strategies

JSON_LEAVES = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
               | st.floats() | st.text(max_size=24))
JSON_VALUES = st.recursive(JSON_LEAVES, lambda c: st.lists(c, max_size=4)
                           | st.dictionaries(st.text(max_size=10), c, max_size=4), max_leaves=10)


def _paths(doc: Any, prefix: tuple = ()) -> list[tuple]:
    out: list[tuple] = []
    items = doc.items() if isinstance(doc, dict) else enumerate(doc[:6]) if isinstance(doc, list) else ()
    for k, v in items:
        out.append(prefix + (k,))
        out += _paths(v, prefix + (k,))
    return out


def _parent(doc: Any, path: tuple) -> Any:
    for k in path[:-1]:
        doc = doc[k]
    return doc


@st.composite
def mutated(draw, base: Any) -> Any:
    """``base`` with one value replaced, one key removed or one key added (or a whole other value)."""
    doc = copy.deepcopy(base)
    paths = _paths(doc)
    kind = draw(st.sampled_from(("replace", "replace", "replace", "delete", "add", "whole")))
    if kind == "whole" or not paths:
        return draw(JSON_VALUES)
    path = draw(st.sampled_from(paths))
    parent = _parent(doc, path)
    if kind == "replace":
        parent[path[-1]] = draw(JSON_VALUES)
    elif kind == "delete":
        del parent[path[-1]]
    elif isinstance(parent, dict):
        parent[draw(st.text(max_size=12))] = draw(JSON_VALUES)
    else:
        parent.append(draw(JSON_VALUES))
    return doc


@st.composite
def json_bytes(draw, base: Any) -> bytes:
    """A JSON file's bytes: ``base`` mutated (most often), or bytes no JSON reader should trust."""
    kind = draw(st.sampled_from(("document",) * 6 + ("bytes", "not_utf8", "deep", "truncated", "array")))
    text = json.dumps(base).encode()
    if kind == "document":
        return json.dumps(draw(mutated(base))).encode()
    if kind == "bytes":
        return draw(st.binary(max_size=200))
    if kind == "not_utf8":
        return draw(st.sampled_from((b"\xff\xfe", b"\x80", b"\xc3("))) + text
    if kind == "deep":
        n = draw(st.integers(min_value=500, max_value=100_000))
        return draw(st.sampled_from((b"[" * n + b"]" * n, b'{"a":' * n + b"1" + b"}" * n)))
    if kind == "array":
        return b"[" + text + b"]"
    return text[:draw(st.integers(min_value=0, max_value=max(0, len(text) - 1)))]


@st.composite
def yaml_text(draw, base: dict) -> bytes:
    kind = draw(st.sampled_from(("document",) * 6 + ("bytes", "alias", "duplicate", "tab")))
    if kind == "document":
        return yaml.safe_dump(draw(mutated(base)), allow_unicode=True).encode()
    if kind == "bytes":
        return draw(st.binary(max_size=300))
    text = yaml.safe_dump(base)
    if kind == "alias":
        return ("a: &x [1, 2]\nb: *x\n" + text).encode()
    if kind == "duplicate":
        return (text + text.splitlines()[0] + "\n").encode()
    return text.replace("  ", "\t", 1).encode()


@st.composite
def mutated_bytes(draw, base: bytes) -> bytes:
    """A valid file's bytes with a few flipped, cut short, or with a block overwritten."""
    data = bytearray(base)
    kind = draw(st.sampled_from(("flip", "flip", "truncate", "block", "random")))
    if kind == "random":
        return draw(st.binary(max_size=400))
    if kind == "truncate":
        return bytes(data[:draw(st.integers(min_value=0, max_value=len(data) - 1))])
    for _ in range(draw(st.integers(min_value=1, max_value=8))):
        at = draw(st.integers(min_value=0, max_value=len(data) - 1))
        if kind == "flip":
            data[at] ^= 1 << draw(st.integers(min_value=0, max_value=7))
        else:
            block = draw(st.binary(min_size=1, max_size=16))
            data[at:at + len(block)] = block
    return bytes(data)


# ---------------------------------------------------------------------------------------------- fixtures of a run


def png_bytes(size: tuple[int, int] = (40, 28), fmt: str = "PNG") -> bytes:
    rgb = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format=fmt)
    return buf.getvalue()


def mp4_bytes(folder: Path, frames: int = 8) -> bytes:
    import av

    path = folder / "base.mp4"
    with av.open(str(path), "w") as c:
        s = c.add_stream("mpeg4", rate=4)
        s.width, s.height, s.pix_fmt = 64, 48, "yuv420p"
        for i in range(frames):
            img = np.full((48, 64, 3), i * 20 % 255, dtype=np.uint8)
            for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in s.encode():
            c.mux(p)
    data = path.read_bytes()
    path.unlink()
    return data


def tsv_text(rows: int = 3) -> str:
    image = base64.b64encode(png_bytes()).decode()
    lines = ["index\tquestion\thint\tA\tB\tC\tanswer\tcategory\timage"]
    for i in range(rows):
        lines.append(f"{i}\tWhat is shown?\t\tred\tgreen\tblue\t{'ABC'[i % 3]}\tcolor\t{image if i == 0 else '0'}")
    return "\n".join(lines) + "\n"


def jsonl_records() -> list[dict]:
    image = "data:image/png;base64," + base64.b64encode(png_bytes()).decode()
    return [{"image": image, "question": "What is shown?", "answer": "noise", "category": "c"},
            {"question": "Two plus two?", "answer": 4}]


def split_safetensors(path: Path) -> tuple[dict, bytes]:
    """A safetensors file as (its JSON header, the tensor bytes after it)."""
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def with_header(header: bytes, body: bytes) -> bytes:
    """A safetensors file of ``header`` (raw JSON bytes, length-prefixed) and ``body``."""
    return len(header).to_bytes(8, "little") + header + body


@dataclass
class Workspace:
    """Copies an example may edit, restored after it: the tiny checkpoint and the tiny artifacts."""

    root: Path
    tiny: Path
    llm: Path
    visual: Path
    serve_llm: Path  # the unedited artifacts `serve` examples run on
    serve_visual: Path
    saved: dict[Path, bytes | None] = field(default_factory=dict)

    @classmethod
    def make(cls, root: Path, tiny: Path, llm: Path, visual: Path) -> "Workspace":
        for src, name in ((tiny, "ck"), (llm, "llm"), (visual, "visual")):
            shutil.copytree(src, root / name)
        return cls(root, root / "ck", root / "llm", root / "visual", llm, visual)

    def write(self, path: Path, data: bytes) -> None:
        self.saved.setdefault(path, path.read_bytes() if path.exists() else None)
        path.write_bytes(data)

    def restore(self) -> None:
        for path, data in self.saved.items():
            if data is None:
                path.unlink(missing_ok=True)
            else:
                path.write_bytes(data)
        self.saved.clear()

    def reseal(self, folder: Path, manifest_text: str | None = None) -> None:
        """The manifest (re)written with its digest, as if the compile had: the digest check passes."""
        import hashlib

        from qvlc.artifact.manifest import Manifest, write_manifest

        if manifest_text is None:
            self.saved.setdefault(folder / "manifest.json", (folder / "manifest.json").read_bytes())
            self.saved.setdefault(folder / "manifest.sha256", (folder / "manifest.sha256").read_bytes())
            write_manifest(folder, Manifest.from_dict(json.loads((folder / "manifest.json").read_text())))
            return
        self.write(folder / "manifest.json", manifest_text.encode("utf-8", "surrogatepass"))
        digest = hashlib.sha256((folder / "manifest.json").read_bytes()).hexdigest()
        self.write(folder / "manifest.sha256", f"{digest}  manifest.json\n".encode())
