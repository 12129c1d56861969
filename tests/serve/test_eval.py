"""`qvlc eval`: benchmark files read as VLMEvalKit keeps them, prompts and answers as it builds and scores them, the
artifacts against the original model (an fp32 artifact agrees on every item), and bad files refused by line and
column with nothing written."""

from __future__ import annotations

import base64
import csv
import io
import json
from pathlib import Path

import pytest
from PIL import Image
from serve_helpers import C, N, S, png_bytes
from typer.testing import CliRunner

from qvlc.cli.app import app
from qvlc.eval.scoring import extract_option, mcq_prompt, normalize
from qvlc.runtime.vlm import VlmPipeline

NEW = 8


def b64png(seed: int, h: int = 100, w: int = 140) -> str:
    return base64.b64encode(png_bytes(h, w, seed)).decode()


def write_tsv(path: Path, rows: list[dict]) -> Path:
    cols = ["index", "question", "hint", "A", "B", "C", "D", "answer", "image", "category"]
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, delimiter="\t")
        w.writeheader()
        w.writerows([{c: r.get(c, "") for c in cols} for r in rows])
    return path


def answer_of(pipe: VlmPipeline, row: dict) -> str:
    """What the artifacts answer to a row, through the same prompt qvlc eval builds."""
    from qvlc.eval.scoring import messages

    im = Image.open(io.BytesIO(base64.b64decode(row["image"]))).convert("RGB")
    options = {k: row[k] for k in "ABCD" if row.get(k)}
    prepared = pipe.prepare_chat(messages(mcq_prompt(row["question"], options, row.get("hint") or None), True), [im])
    return pipe.generate_prepared(prepared, NEW).text


def run(args: list[str]):
    return CliRunner().invoke(app, args)


@pytest.fixture(scope="module")
def fp16_artifacts(compiled):
    llm = compiled(name="eval_llm_fp16", prefill_len=S, max_context=C, dtype="fp16", validate={"enabled": False})
    vis = compiled(name="eval_visual_fp16", part="visual", max_patches=N, dtype="fp16", validate={"enabled": False})
    return llm.folder, vis.folder


@pytest.fixture(scope="module")
def bench(serve_artifacts, tmp_path_factory) -> Path:
    """Four MMBench rows; the first's option A is a word the artifacts will answer, so scoring is exercised for
    real: item 1 is right (answer A), item 2 wrong (answer B, same options), item 4 reuses item 1's image."""
    pipe = VlmPipeline(*serve_artifacts)
    base = {"question": "What is shown?", "hint": "Look.", "image": b64png(1), "category": "scene"}
    word = answer_of(pipe, {**base, "A": "placeholder", "B": "zzzz"}).split()[0]
    rows = [{**base, "index": "1", "A": word, "B": "zzzz", "answer": "A"},
            {**base, "index": "2", "A": word, "B": "zzzz", "answer": "B"},
            {"index": "3", "question": "Which one?", "A": "cat", "B": "dog", "C": "bird", "answer": "C",
             "image": b64png(2, 90, 120), "category": "animal"},
            {**base, "index": "4", "A": word, "B": "zzzz", "answer": "A", "image": "1"}]
    return write_tsv(tmp_path_factory.mktemp("bench") / "mmbench.tsv", rows)


def test_fp32_artifact_agrees_with_its_reference_on_every_item(serve_artifacts, bench, tmp_path):
    out = tmp_path / "results.json"
    r = run(["eval", *map(str, serve_artifacts), "--data", str(bench), "--reference", "--out", str(out),
             "--max-new-tokens", str(NEW)])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert res["items"] == 4 and res["agreement"] == 1.0 and res["text_agreement"] == 1.0
    assert res["reference_accuracy"] == res["accuracy"] == 0.5  # items 1 and 4 right, 2 and 3 wrong
    preds = {p["index"]: p for p in res["predictions"]}
    assert preds["1"]["correct"] and not preds["2"]["correct"] and preds["4"]["correct"]
    assert all(p["text"] == p["reference_text"] for p in preds.values())
    assert set(res["per_category"]) == {"scene", "animal"} and res["per_category"]["scene"]["accuracy"] == 2 / 3
    assert res["time_to_first_token_s"]["median"] > 0 and "accuracy" in r.output


def test_fp16_artifact_reports_where_it_disagrees(fp16_artifacts, bench, tmp_path):
    out = tmp_path / "results.json"
    r = run(["eval", *map(str, fp16_artifacts), "--data", str(bench), "--reference", "--out", str(out),
             "--max-new-tokens", str(NEW), "--limit", "3"])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert res["items"] == 3
    differ = [p["index"] for p in res["predictions"] if p["prediction"] != p["reference_prediction"]]
    assert res["disagreements"] == differ and res["agreement"] == 1 - len(differ) / 3


def test_open_vqa_jsonl_exact_match(serve_artifacts, tmp_path):
    (tmp_path / "imgs").mkdir()
    (tmp_path / "imgs" / "a.png").write_bytes(png_bytes(100, 140, 3))
    pipe = VlmPipeline(*serve_artifacts)
    from qvlc.eval.scoring import messages, vqa_prompt

    prepared = pipe.prepare_chat(messages(vqa_prompt("What is it?"), True),
                                 [Image.open(tmp_path / "imgs" / "a.png").convert("RGB")])
    said = pipe.generate_prepared(prepared, NEW).text
    lines = [{"image": "imgs/a.png", "question": "What is it?", "answer": said.upper() + "."},
             {"image": "data:image/png;base64," + b64png(3, 100, 140), "question": "What is it?", "answer": "x"}]
    data = tmp_path / "vqa.jsonl"
    data.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    r = run(["eval", *map(str, serve_artifacts), "--data", str(data), "--out", str(tmp_path / "r.json"),
             "--max-new-tokens", str(NEW)])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "r.json").read_text())
    assert [p["correct"] for p in res["predictions"]] == [True, False] and res["accuracy"] == 0.5


BAD_TSV = {
    "missing_column": ([{"index": "1", "question": "q", "A": "a", "B": "b", "answer": "A"}], "line 1", "image",
                       ["index", "question", "A", "B", "answer"]),
    "bad_base64": ([{"index": "1", "question": "q", "A": "a", "B": "b", "answer": "A", "image": "@" * 100}], "line 2",
                   "image", None),
    "answer_not_an_option": ([{"index": "1", "question": "q", "A": "a", "B": "b", "answer": "E", "image": "x" * 100}],
                             "line 2", "answer", None),
    "dangling_image_reference": ([{"index": "1", "question": "q", "A": "a", "B": "b", "answer": "A", "image": "7"}],
                                 "line 2", "image", None),
}


@pytest.mark.parametrize("case", list(BAD_TSV))
def test_bad_tsv_names_line_and_column_and_writes_nothing(serve_artifacts, tmp_path, case):
    rows, line, column, cols = BAD_TSV[case]
    data = tmp_path / "bad.tsv"
    with open(data, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols or list(rows[0]), delimiter="\t")
        w.writeheader()
        w.writerows(rows)
    out = tmp_path / "results.json"
    r = run(["eval", *map(str, serve_artifacts), "--data", str(data), "--out", str(out)])
    assert r.exit_code == 2 and f"{line}, column '{column}'" in r.output and "Traceback" not in r.output, r.output
    assert not out.exists() and not list(tmp_path.glob(".results.json*"))


@pytest.mark.parametrize("line,expect", [("{not json", "char 2"), (json.dumps({"question": "q", "answer": "a",
                                                                                "image": "../../etc/hostname"}),
                                                                     "image")])
def test_bad_jsonl_names_line_and_column(serve_artifacts, tmp_path, line, expect):
    data = tmp_path / "bad.jsonl"
    data.write_text(json.dumps({"question": "q", "answer": "a"}) + "\n" + line + "\n")
    r = run(["eval", *map(str, serve_artifacts), "--data", str(data), "--out", str(tmp_path / "r.json")])
    assert r.exit_code == 2 and "line 2" in r.output and expect in r.output, r.output
    assert not (tmp_path / "r.json").exists()


def test_prompts_and_answer_extraction_follow_vlmevalkit():
    assert mcq_prompt("Q?", {"A": "x", "B": "y"}, "H") == \
        "Hint: H\nQuestion: Q?\nOptions:\nA. x\nB. y\nPlease select the correct answer from the options above."
    assert mcq_prompt("哪个?", {"A": "x", "B": "y"}).endswith("请直接回答选项字母。")
    opts = {"A": "red apple", "B": "green pear", "C": "blue sky"}
    assert extract_option("The answer is (B).", opts) == "B"
    assert extract_option("B", opts) == "B"
    assert extract_option("A or B", opts) is None  # two letters: undecided
    assert extract_option("It is the blue sky.", opts) == "C"  # the option's text, when no letter stands alone
    assert extract_option("nothing useful", opts) is None
    assert normalize("The  Answer: 3.5 apples.") == normalize("answer 3.5 apples")


def test_items_the_artifacts_cannot_take_are_scored_wrong_not_fatal(serve_artifacts, tmp_path):
    big = base64.b64encode(png_bytes(700, 700, 4)).decode()  # 625 image tokens: more than the prefill window
    data = write_tsv(tmp_path / "b.tsv", [{"index": "1", "question": "q", "A": "a", "B": "b", "answer": "A",
                                           "image": big}])
    r = run(["eval", *map(str, serve_artifacts), "--data", str(data), "--out", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "r.json").read_text())
    assert res["errors"] == 1 and "export.prefill_len" in res["predictions"][0]["error"]
