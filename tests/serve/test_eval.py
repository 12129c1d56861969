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
from qvlc.eval.scoring import extract_option, mcq_prompt, normalize, vqa_score
from qvlc.runtime.vlm import VlmPipeline

NEW = 8


def b64png(seed: int, h: int = 100, w: int = 140) -> str:
    return base64.b64encode(png_bytes(h, w, seed)).decode()


def write_tsv(path: Path, rows: list[dict]) -> Path:
    cols = ["index", "question", "hint", "A", "B", "C", "D", "answer", "image", "category", "split", "l2-category"]
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
    other = "zzzz " * 8  # long: the answer stays within can_infer's length guard (twice the options' length)
    word = answer_of(pipe, {**base, "A": "placeholder", "B": other}).split()[0]
    rows = [{**base, "index": "1", "A": word, "B": other, "answer": "A"},
            {**base, "index": "2", "A": word, "B": other, "answer": "B"},
            {"index": "3", "question": "Which one?", "A": "cat", "B": "dog", "C": "bird", "answer": "C",
             "image": b64png(2, 90, 120), "category": "animal"},
            {**base, "index": "4", "A": word, "B": other, "answer": "A", "image": "1"}]
    return write_tsv(tmp_path_factory.mktemp("bench") / "mmbench.tsv", rows)


def test_fp32_artifact_agrees_with_its_reference_on_every_item(serve_artifacts, bench, tmp_path):
    out = tmp_path / "results.json"
    r = run(["eval", *map(str, serve_artifacts), "--data", str(bench), "--reference", "--out", str(out),
             "--max-new-tokens", str(NEW)])
    assert r.exit_code == 0, r.output
    res = json.loads(out.read_text())
    assert res["items"] == res["questions"] == 4 and res["agreement"] == 1.0 and res["text_agreement"] == 1.0
    assert res["metric"] == "vanilla" and res["question_agreement"] == 1.0
    assert res["reference_accuracy"] == res["accuracy"] == res["vanilla_all_accuracy"] == 0.5  # 1 and 4 right
    preds = {p["index"]: p for p in res["predictions"]}
    assert preds["1"]["correct"] and not preds["2"]["correct"] and preds["4"]["correct"]
    assert all(p["text"] == p["reference_text"] for p in preds.values())
    assert set(res["by_category"]) == {"scene", "animal"} and res["by_category"]["scene"]["accuracy"] == 2 / 3
    assert res["by_category"]["scene"]["questions"] == 3 and set(res["by_split"]) == {"none"}
    assert all(p["vision_tokens"] > 0 and not p["resized"] for p in preds.values())
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
             {"image": "data:image/png;base64," + b64png(3, 100, 140), "question": "What is it?", "answer": "x"},
             {"image": "imgs/a.png", "question": "What is it?", "answer": ["x", said, said, said, "y"]}]
    data = tmp_path / "vqa.jsonl"
    data.write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    r = run(["eval", *map(str, serve_artifacts), "--data", str(data), "--out", str(tmp_path / "r.json"),
             "--max-new-tokens", str(NEW)])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "r.json").read_text())
    assert [p["correct"] for p in res["predictions"]] == [True, False, True] and res["accuracy"] == 2 / 3
    # VQA's score: one reference answer scores 0 by construction; for the list, the prediction matches 3 of 5
    # answers: each of those sees 2 others (2/3), each other answer sees 3 (1): (3 * 2/3 + 2 * 1) / 5 = 0.8
    assert [p["vqa_score"] for p in res["predictions"]] == pytest.approx([0.0, 0.0, 0.8])
    assert res["vqa_score"] == pytest.approx(0.8 / 3)


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


def test_answer_extraction_is_vlmevalkits_head_rules():
    """e8e78f0's can_infer: the position rule, "answer is X", the length guard, refusals."""
    opts = {"A": "red apple", "B": "green pear", "C": "blue sky", "D": "grey cloud"}
    assert extract_option("A is what I would pick since it is red and round", opts) is None  # letter too early
    assert extract_option("Looking at the image closely, I pick B", opts) == "B"  # among the last five words
    assert extract_option("I think the correct answer is **B** because the sky is blue and clear", opts) == "B"
    assert extract_option("Cannot determine the answer from this image.", opts) == "Z"
    assert extract_option("blue sky", opts) == "C"
    assert extract_option("It is blue sky " + "and more words " * 10, opts) is None  # the length guard
    assert vqa_score("Two", ["2", "2", "2", "3"]) == pytest.approx(0.75)
    assert vqa_score("the dog", ["dog"]) == 0.0  # one reference answer: VQA's score is 0 by construction


def test_images_beyond_the_artifacts_are_resized_to_them_not_refused(serve_artifacts, tmp_path):
    big = base64.b64encode(png_bytes(700, 700, 4)).decode()  # 625 image tokens: more than N and the prefill window
    data = write_tsv(tmp_path / "b.tsv", [{"index": "1", "question": "q", "A": "a", "B": "b", "answer": "A",
                                           "image": big}])
    r = run(["eval", *map(str, serve_artifacts), "--data", str(data), "--out", str(tmp_path / "r.json")])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "r.json").read_text())
    p = res["predictions"][0]
    assert res["errors"] == 0 and res["resized"] == 1 and p["resized"] and p["error"] is None
    assert 0 < p["vision_tokens"] <= min(N // 4, S)


def test_vlmevalkit_preset_is_clamped_to_the_artifact_with_a_note(serve_artifacts, tmp_path):
    data = write_tsv(tmp_path / "b.tsv", [{"index": "1", "question": "q", "A": "a", "B": "b", "answer": "A",
                                           "image": b64png(5, 60, 80)}])
    r = run(["eval", *map(str, serve_artifacts), "--data", str(data), "--out", str(tmp_path / "r.json"),
             "--preset", "vlmevalkit", "--max-new-tokens", "2"])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "r.json").read_text())
    s = res["image_settings"]
    assert (s["asked_min_pixels"], s["asked_max_pixels"]) == (1280 * 28 * 28, 16384 * 28 * 28)
    assert s["max_pixels"] == s["min_pixels"] == N * 14 * 14 and "note: --max-pixels" in r.output
    # a 60 x 80 image, upscaled toward VLMEvalKit's 1280 tokens, stops at what the visual graph holds
    p = res["predictions"][0]
    assert p["error"] is None and N // 8 < p["vision_tokens"] <= N // 4 and p["resized"]


def test_circular_eval_counts_a_question_only_when_every_rotation_is_right(serve_artifacts, tmp_path):
    """MMBench's circular copies (index q + k·1e6): the answers the artifacts give decide, row by row, whether each
    rotation is right; the question is right only if all are, and --limit takes whole questions."""
    rows = []
    for q, (seed, options) in enumerate([(6, ["cat", "dog", "bird"]), (7, ["red", "green", "blue"])], start=1):
        for k in range(3):
            opts = options[k:] + options[:k]
            rows.append({"index": str(q + k * 1_000_000), "question": "Which?", "A": opts[0], "B": opts[1],
                         "C": opts[2], "answer": "ABC"[(0 - k) % 3], "image": b64png(seed, 60, 80) if k == 0
                         else str(q), "category": f"c{q}", "split": "dev"})
    data = write_tsv(tmp_path / "c.tsv", rows)
    r = run(["eval", *map(str, serve_artifacts), "--data", str(data), "--out", str(tmp_path / "r.json"),
             "--max-new-tokens", str(NEW)])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "r.json").read_text())
    ps = res["predictions"]
    by_q = {q: all(p["correct"] for p in ps if p["question"] == q) for q in ("1", "2")}
    assert res["metric"] == "circular" and res["questions"] == 2 and res["items"] == 6
    assert res["accuracy"] == sum(by_q.values()) / 2
    assert res["vanilla_0_accuracy"] == sum(p["correct"] for p in ps if not p["rotated"]) / 2
    assert res["vanilla_all_accuracy"] == sum(p["correct"] for p in ps) / 6
    assert res["by_category"]["c1"]["accuracy"] == by_q["1"] and res["by_split"]["dev"]["questions"] == 2
    # each row's score is what can_infer makes of the text the artifacts gave
    assert all(p["correct"] == (extract_option(p["text"], dict(zip("ABC", [r["A"], r["B"], r["C"]])))
                                == r["answer"]) for p, r in zip(ps, rows))
    r = run(["eval", *map(str, serve_artifacts), "--data", str(data), "--out", str(tmp_path / "l.json"),
             "--max-new-tokens", "2", "--limit", "1"])
    lim = json.loads((tmp_path / "l.json").read_text())
    assert lim["questions"] == 1 and [p["index"] for p in lim["predictions"]] == ["1", "1000001", "2000001"]
