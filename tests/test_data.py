"""data.py: the shapes generator, the official VQA normalization and metric, the VQA v2 loader."""
import json
import math
import os
import re
import shutil

import numpy as np
import pytest
import torch

import data
from data import DataConfig, DataError

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "vqa")


# ---------------------------------------------------------------- official normalization and metric
@pytest.mark.parametrize("raw, expected", [
    ("Two", "2"), ("the dog", "dog"), ("dont", "don't"), ("none", "0"), ("A Red Bus", "red bus"),
    ("t-shirt", "t shirt"), ("mr. smith", "mr smith"), ("1,000", "1000"), ("yes!", "yes"),
    ("  Ten\n", "10"), ("3.5", "3.5"), ("isnt it", "isn't it"),
])
def test_normalize_answer_official_examples(raw, expected):
    assert data.normalize_answer(raw) == expected


def test_normalization_is_idempotent_on_its_outputs():
    for raw in ["Two", "the dog", "dont", "t-shirt", "1,000", "mr. smith", "red, white", "3.5"]:
        once = data.normalize_answer(raw)
        assert data.normalize_answer(once) == once


@pytest.mark.parametrize("k, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (7, 1.0)])
def test_ten_answer_leave_one_out_scores(k, expected):
    answers = ["cat"] * k + ["dog"] * (10 - k) if k < 10 else ["cat"] * 10
    assert data.vqa_accuracy("cat", answers) == pytest.approx(expected)


def test_metric_normalizes_only_when_humans_disagree():
    # not unanimous: "Two"/"2"/"two" all count for the prediction "2"
    assert data.vqa_accuracy("2", ["Two"] * 4 + ["2"] * 3 + ["three"] * 3) == pytest.approx(1.0)
    # unanimous: the official script compares the raw (stripped) string
    assert data.vqa_accuracy("2", ["Two"] * 10) == 0.0
    assert data.vqa_accuracy("Two", ["Two"] * 10) == 1.0


def test_fewer_than_ten_answers():
    assert data.vqa_accuracy("yes", ["yes"]) == 1.0
    assert data.vqa_accuracy("yes", ["yes", "no", "no", "no", "no"]) == pytest.approx(1 / 3)
    assert data.vqa_accuracy("no", ["yes", "no"]) == pytest.approx(0.5)


# ---------------------------------------------------------------- the shapes generator
def test_generator_is_deterministic_by_seed():
    a_img, a_rec, a_lab = data.generate_shapes_split(20, 4, seed=7)
    b_img, b_rec, b_lab = data.generate_shapes_split(20, 4, seed=7)
    c_img, _, _ = data.generate_shapes_split(20, 4, seed=8)
    assert np.array_equal(a_lab, b_lab)
    assert np.array_equal(a_img, b_img) and a_rec == b_rec
    assert not np.array_equal(a_img, c_img)


def _answer_from_scene(question: str, objs) -> set:
    """An independent reading of a question: every answer consistent with the scene."""
    def named(phrase):
        words = phrase.split()
        return [o for o in objs if all(w in (o.color, o.shape, o.shape + "s", "object", "objects", "thing") for w in words)
                and (len(words) < 2 or words[0] in data.COLORS or words[0] == o.shape)]
    m = re.search(r"(closest to|farthest from) the (.+?)(?: has| \?|\?)", question)
    if m:
        refs = named(m.group(2))
        assert len(refs) == 1, f"reference not unique: {question}"
        ref = refs[0]
        others = sorted((math.hypot(o.x - ref.x, o.y - ref.y), o.color, o.shape) for o in objs if o is not ref)
        target = others[-1] if m.group(1) == "farthest from" else others[0]
        assert abs(others[-1][0] - others[-2][0]) >= 4 if m.group(1) == "farthest from" else others[1][0] - others[0][0] >= 4
        return {target[1] if "color" in question else target[2]}
    if question.startswith("how many") or question.startswith("what is the number"):
        thing = re.sub(r"^(how many|what is the number of) | (are there|can you see|objects are there|objects)\?$|\?$", "", question)
        thing = thing.replace("things are ", "").replace(" objects", "")
        return {str(sum(o.color == thing or o.shape + "s" == thing for o in objs))}
    for c in data.COLORS:
        for s in data.SHAPES:
            if re.search(rf"\bthe {s}\b", question) and "color" in question:
                matches = [o for o in objs if o.shape == s]
                assert len(matches) == 1, f"ambiguous: {question}"
                return {matches[0].color}
        if re.search(rf"\b{c}\b", question) and "shape" in question:
            matches = [o for o in objs if o.color == c]
            assert len(matches) == 1, f"ambiguous: {question}"
            return {matches[0].shape}
    return {"yes", "no"}  # exist/compare: checked below by counting


def test_generated_questions_are_unambiguous_and_correct():
    rng = np.random.default_rng(3)
    for _ in range(150):
        _, objs, qas = data.make_image_with_questions(rng, list(data.FAMILIES))
        for family, question, answer in qas:
            assert answer in _answer_from_scene(question, objs), (family, question, answer)
            if family == "compare":
                groups = re.match(r"(?:are there|does the image have) (more|fewer) (.+) than (.+)\?", question)
                count = lambda g: sum(o.color + " objects" == g or o.shape + "s" == g for o in objs)
                a, b = count(groups.group(2)), count(groups.group(3))
                assert a != b
                assert answer == ("yes" if (a > b) == (groups.group(1) == "more") else "no")


def test_families_balanced_and_yes_no_balanced():
    _, records, _ = data.generate_shapes_split(600, 4, seed=1)
    fams = [r["family"] for r in records]
    for fam in data.FAMILIES:
        assert abs(fams.count(fam) / len(fams) - 1 / 6) < 0.02
    for fam in ["exist", "compare"]:
        answers = [r["answers"][0] for r in records if r["family"] == fam]
        assert 0.42 < answers.count("yes") / len(answers) < 0.58


def test_shapes_splits_are_disjoint():
    cfg = DataConfig(train_images=30, val_images=10, test_images=10)
    splits = data.shapes_splits(cfg)
    ids = [{r["image_id"] for r in recs} for _, recs, _ in splits.values()]
    assert not (ids[0] & ids[1]) and not (ids[0] & ids[2]) and not (ids[1] & ids[2])
    train_imgs = {img.tobytes() for img in splits["train"][0]}
    assert not any(img.tobytes() in train_imgs for img in splits["test"][0])


def test_tokenizer_adds_cls_and_pads():
    tok = data.train_tokenizer(["is there a red circle?", "how many squares are there?"], 100, 12)
    ids, mask = data.encode_questions(tok, ["is there a red circle?", "red?"])
    assert ids.shape == (2, 12) and ids[0, 0] == tok.token_to_id("[CLS]")
    assert mask[1].sum() == 4 and ids[1, 4] == tok.token_to_id("[PAD]")


# ---------------------------------------------------------------- the VQA v2 loader
def vqa_cfg(**kw):
    base = dict(data="vqa2", vqa_questions=os.path.join(FIXTURE, "questions.json"),
                vqa_annotations=os.path.join(FIXTURE, "annotations.json"), vqa_images=os.path.join(FIXTURE, "images"),
                image_size=32, num_answers=20)
    return DataConfig(**(base | kw))


def test_vqa2_loader_splits_by_image_and_scores_officially():
    splits, tok, answers = data.load_data(vqa_cfg())
    sizes = {k: len({r["image_id"] for r in s.records}) for k, s in splits.items()}
    assert sizes == {"train": 16, "val": 2, "test": 2}
    assert splits["train"].images.shape[1:] == (3, 32, 32)
    assert "2" in answers and "two" not in answers and "dog" in answers
    for split in splits.values():
        for i, r in enumerate(split.records):
            for a in answers:
                pred = torch.tensor([answers.index(a)])
                assert split.score(torch.tensor([i]), pred).item() == pytest.approx(data.vqa_accuracy(a, r["answers"]))


def test_vqa2_split_is_deterministic():
    a, _, _ = data.load_data(vqa_cfg())
    b, _, _ = data.load_data(vqa_cfg())
    assert [r["question_id"] for r in a["test"].records] == [r["question_id"] for r in b["test"].records]


def test_written_shapes_round_trip_through_vqa2_loader(tmp_path):
    cfg = DataConfig(train_images=20, val_images=5, test_images=5, questions_per_image=3)
    data.write_vqa_format(cfg, str(tmp_path))
    splits, _, answers = data.load_data(vqa_cfg(vqa_questions=str(tmp_path / "questions.json"),
                                                vqa_annotations=str(tmp_path / "annotations.json"),
                                                vqa_images=str(tmp_path / "images"), image_size=64))
    assert sum(len(s) for s in splits.values()) == 90
    original = data.shapes_splits(cfg)["train"][0][0]
    all_images = torch.cat([s.images for s in splits.values()])
    assert any(torch.equal(img.permute(1, 2, 0), torch.from_numpy(original)) for img in all_images)


# ---------------------------------------------------------------- bad input: one clear DataError each
def _copy_fixture(tmp_path):
    shutil.copytree(FIXTURE, tmp_path / "vqa")
    return tmp_path / "vqa"


@pytest.mark.parametrize("change, message", [
    (dict(vqa_questions="/nonexistent/q.json"), "file not found"),
    (dict(vqa_images="/nonexistent/images"), "directory not found"),
    (dict(vqa_questions=""), "needs --vqa-questions"),
])
def test_bad_paths(change, message):
    with pytest.raises(DataError, match=message):
        data.load_data(vqa_cfg(**change))


def test_malformed_json_and_missing_keys(tmp_path):
    d = _copy_fixture(tmp_path)
    (d / "questions.json").write_text("{not json")
    with pytest.raises(DataError, match="questions.json: malformed JSON"):
        data.load_data(vqa_cfg(vqa_questions=str(d / "questions.json")))
    (d / "annotations.json").write_text(json.dumps({"annotations": [{"question_id": 1}]}))
    with pytest.raises(DataError, match="missing key 'answers'"):
        data.load_data(vqa_cfg(vqa_annotations=str(d / "annotations.json")))


def test_empty_question_string(tmp_path):
    d = _copy_fixture(tmp_path)
    q = json.loads((d / "questions.json").read_text())
    q["questions"][3]["question"] = "  "
    (d / "questions.json").write_text(json.dumps(q))
    with pytest.raises(DataError, match="question 4 is an empty string"):
        data.load_data(vqa_cfg(vqa_questions=str(d / "questions.json")))


def test_missing_images_fail_unless_skipped(tmp_path):
    d = _copy_fixture(tmp_path)
    os.remove(d / "images" / "COCO_val2014_000000000003.jpg")
    with pytest.raises(DataError, match="2 of 40 questions have no image.*--skip-missing-images"):
        data.load_data(vqa_cfg(vqa_images=str(d / "images")))
    splits, _, _ = data.load_data(vqa_cfg(vqa_images=str(d / "images"), skip_missing_images=True))
    assert sum(len(s) for s in splits.values()) == 38


def test_undecodable_image(tmp_path):
    d = _copy_fixture(tmp_path)
    (d / "images" / "4.png").write_bytes(b"this is not a png")
    with pytest.raises(DataError, match="cannot decode image .*4.png"):
        data.load_data(vqa_cfg(vqa_images=str(d / "images")))
