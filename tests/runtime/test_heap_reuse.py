"""``qvlc.system.malloc.heap_reuse``: graph calls take their large buffers from the heap and reuse them (ONNX Runtime's
per-call fp32 cast of an fp16 weight stops faulting in fresh pages), hand them back when the block ends, and
compute bit for bit what they compute without it."""

from __future__ import annotations

import contextlib
import resource

import numpy as np
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from qvlc.runtime.sessions import session_options
from qvlc.system.malloc import heap_reuse
from qvlc.validate.phases import resident_gb

K, N = 1536, 8960  # a 2B MLP weight: its fp32 cast is 55 MB, above glibc's 32 MB mmap ceiling
PAGES = K * N * 4 // 4096


def fp16_matmul() -> tuple[ort.InferenceSession, np.ndarray]:
    w = numpy_helper.from_array((np.random.default_rng(0).standard_normal((K, N)) * 0.02).astype(np.float16), "w")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "mm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT16, [1, 1, K])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, [1, 1, N])], [w])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    sess = ort.InferenceSession(model.SerializeToString(), session_options(), providers=["CPUExecutionProvider"])
    return sess, np.random.default_rng(1).standard_normal((1, 1, K)).astype(np.float16)


def faults(call) -> tuple[int, object]:
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    out = call()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before, out


def fresh(calls: list[int]) -> int:
    """How many of the calls faulted in a whole fresh cast buffer. Inside heap_reuse a few still do: small
    allocations between calls can split the freed chunk, and the heap grows by one more before it settles
    (measured: 0 to 12 of 20 calls, depending on what the process allocated before)."""
    return sum(c > PAGES / 2 for c in calls)


def in_fresh_process(name: str) -> None:
    """Run ``name`` (a function below) in a new interpreter. What the heap does depends on the process's history: a
    failed huge allocation in an earlier test (a fuzz case asking numpy for petabytes) makes glibc move the failing
    thread to a secondary arena for good (``arena_get_retry``), whose 64 MB heaps are unmapped when freed — so the
    cast faults in afresh again (seen once in CI: 18 of 20 calls). A new process starts on the main arena."""
    import subprocess
    import sys

    done = subprocess.run([sys.executable, __file__, name], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr


def cast_faulted_in_once_inside_and_on_every_call_outside():
    sess, x = fp16_matmul()
    call = lambda: sess.run(None, {"x": x})[0]  # noqa: E731
    call()
    outside = [faults(call)[0] for _ in range(3)]
    with heap_reuse():
        inside = [faults(call) for _ in range(20)]
    assert fresh(outside) == len(outside), outside  # a fresh mapping of the cast every call
    assert fresh([f for f, _ in inside]) <= 15, [f for f, _ in inside]  # the freed cast's pages, reused
    y = call()
    assert all(np.array_equal(y.view(np.uint16), out.view(np.uint16)) for _, out in inside)  # the same bits


def block_hands_its_heap_back_and_nested_blocks_keep_reusing():
    sess, x = fp16_matmul()
    call = lambda: sess.run(None, {"x": x})[0]  # noqa: E731
    call()
    anon0 = resident_gb()[0]
    with heap_reuse():
        with heap_reuse():
            for _ in range(10):
                call()
        # the inner block's end did not give the outer one's heap away
        assert fresh([faults(call)[0] for _ in range(10)]) <= 7
        held = resident_gb()[0] - anon0
    released = resident_gb()[0] - anon0
    assert held > PAGES * 4096 / 1e9 / 2, held  # the cast buffer is kept while the block runs ...
    assert released < held - PAGES * 4096 / 1e9 / 2, (held, released)  # ... and handed back after it


def test_the_weights_cast_is_faulted_in_once_inside_and_on_every_call_outside():
    in_fresh_process("cast_faulted_in_once_inside_and_on_every_call_outside")


def test_the_block_hands_its_heap_back_when_it_ends_and_nested_blocks_keep_reusing():
    in_fresh_process("block_hands_its_heap_back_and_nested_blocks_keep_reusing")


def test_ranked_graphs_run_inside_heap_reuse(monkeypatch):
    import qvlc.runtime.ranked as ranked

    entered = []

    @contextlib.contextmanager
    def spy():
        entered.append(True)
        yield

    sess, x = fp16_matmul()
    graph = ranked.RankedGraph.__new__(ranked.RankedGraph)
    graph.segments, graph.reduce_names, graph.paths = [[sess]], [], []
    monkeypatch.setattr(ranked, "heap_reuse", spy)
    (out,), = graph.run_many([[{"x": x}]])
    assert entered == [True] and out["y"].shape == (1, 1, N)


if __name__ == "__main__":
    import sys

    globals()[sys.argv[1]]()
