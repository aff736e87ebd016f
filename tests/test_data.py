"""data.py: the shapes generator, the official VQA normalization and metric, the VQA v2 loader."""
import json
import math
import os
import re
import shutil
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

import data
from data import DataConfig, DataError
from util import shapes, vqa

FIXTURE = os.path.join(os.path.dirname(__file__), "fixtures", "vqa")


# ---------------------------------------------------------------- official normalization and metric
@pytest.mark.parametrize("raw, expected", [
    ("Two", "2"), ("the dog", "dog"), ("dont", "don't"), ("none", "0"), ("A Red Bus", "red bus"),
    ("t-shirt", "t shirt"), ("mr. smith", "mr smith"), ("1,000", "1000"), ("yes!", "yes"),
    ("  Ten\n", "10"), ("3.5", "3.5"), ("isnt it", "isn't it"),
])
def test_normalize_answer_official_examples(raw, expected):
    assert vqa.normalize_answer(raw) == expected


def test_normalization_is_idempotent_on_its_outputs():
    for raw in ["Two", "the dog", "dont", "t-shirt", "1,000", "mr. smith", "red, white", "3.5"]:
        once = vqa.normalize_answer(raw)
        assert vqa.normalize_answer(once) == once


@pytest.mark.parametrize("k, expected", [(0, 0.0), (1, 0.3), (2, 0.6), (3, 0.9), (4, 1.0), (7, 1.0)])
def test_ten_answer_leave_one_out_scores(k, expected):
    answers = ["cat"] * k + ["dog"] * (10 - k) if k < 10 else ["cat"] * 10
    assert vqa.vqa_accuracy("cat", answers) == pytest.approx(expected)


def test_metric_normalizes_only_when_humans_disagree():
    # not unanimous: "Two"/"2"/"two" all count for the prediction "2"
    assert vqa.vqa_accuracy("2", ["Two"] * 4 + ["2"] * 3 + ["three"] * 3) == pytest.approx(1.0)
    # unanimous: the official script compares the raw (stripped) string
    assert vqa.vqa_accuracy("2", ["Two"] * 10) == 0.0
    assert vqa.vqa_accuracy("Two", ["Two"] * 10) == 1.0


# Hand-computed with the official vqaEval.py rules (not with this code): k matching humans of 10 score
# k = 1 -> 0.3, 2 -> 0.6, 3 -> 0.9, 4+ -> 1.
@pytest.mark.parametrize("prediction, answers, expected", [
    # punctuation: "-" touches no space and there is no digit,digit pattern, so it becomes a space
    ("T-Shirt", ["t-shirt"] * 2 + ["shirt"] * 8, 0.6),
    ("t shirt", ["t-shirt"] * 2 + ["shirt"] * 8, 0.6),
    # a digit,digit pattern: every punctuation mark is deleted, "1,000" -> "1000"
    ("1000", ["1,000"] * 2 + ["one thousand"] * 8, 0.6),
    ("1 thousand", ["1,000"] * 2 + ["one thousand"] * 8, 1.0),
    # "!" touching a space is deleted; "yes !" -> "yes"
    ("yes", ["yes !"] * 3 + ["no"] * 7, 0.9),
    # articles are dropped anywhere in the phrase, not only in front
    ("on table", ["on the table"] * 3 + ["table"] * 7, 0.9),
    ("table", ["on the table"] * 3 + ["table"] * 7, 1.0),
    # disagreeing humans: number words and digits meet
    ("2", ["two"] + ["2"] + ["three"] * 8, 0.6),
    ("3", ["two"] + ["2"] + ["three"] * 8, 1.0),
    # a period is dropped unless a digit follows it
    ("mr smith", ["Mr. Smith"] * 4 + ["smith"] * 6, 1.0),
    ("3.5", ["3.5"] * 1 + ["35"] * 9, 0.3),
    # the official contraction table's quirks: "im" is never expanded (the key is "Im", but words are
    # lowercased first), nor are "shes" and "lets" (the keys are "she's" and "let's", mapped to themselves)...
    ("i'm", ["im"] * 2 + ["no"] * 8, 0.0),
    ("im", ["im"] * 2 + ["no"] * 8, 0.6),
    ("she's", ["shes"] * 2 + ["no"] * 8, 0.0),
    ("let's", ["lets"] * 2 + ["no"] * 8, 0.0),
    # ... and "somebody'd" becomes "somebodyd"
    ("somebodyd", ["somebody'd"] * 3 + ["no"] * 7, 0.9),
    ("dont", ["dont"] * 3 + ["no"] * 7, 0.9),          # "dont" -> "don't" on both sides
])
def test_official_metric_on_hand_computed_cases(prediction, answers, expected):
    assert vqa.vqa_accuracy(prediction, answers) == pytest.approx(expected)


def test_at_most_32_periods_are_dropped_as_in_the_official_script():
    # the official call passes re.UNICODE (32) as sub()'s count: the 33rd period and later stay
    assert vqa.normalize_answer("a" + "." * 40) == "a" + "." * 8


def test_fewer_than_ten_answers():
    assert vqa.vqa_accuracy("yes", ["yes"]) == 1.0
    assert vqa.vqa_accuracy("yes", ["yes", "no", "no", "no", "no"]) == pytest.approx(1 / 3)
    assert vqa.vqa_accuracy("no", ["yes", "no"]) == pytest.approx(0.5)


# ---------------------------------------------------------------- the shapes generator
def test_generator_is_deterministic_by_seed():
    a_img, a_rec, a_lab = shapes.generate_shapes_split(20, 4, seed=7)
    b_img, b_rec, b_lab = shapes.generate_shapes_split(20, 4, seed=7)
    c_img, _, _ = shapes.generate_shapes_split(20, 4, seed=8)
    assert np.array_equal(a_lab, b_lab)
    assert np.array_equal(a_img, b_img) and a_rec == b_rec
    assert not np.array_equal(a_img, c_img)


def _objects_in_pixels(labels: np.ndarray) -> list[dict]:
    """What is drawn, read back from a scene's pixel labels (2, H, W) alone: one dict per connected blob
    (4-neighbours) with its colour, shape and centroid. Shapes never touch, so blobs are objects."""
    colors, seen, blobs = list(shapes.COLORS), np.zeros(labels.shape[1:], dtype=bool), []
    for y0, x0 in zip(*np.nonzero(labels[0])):
        if seen[y0, x0]:
            continue
        stack, pixels = [(y0, x0)], []
        seen[y0, x0] = True
        while stack:
            y, x = stack.pop()
            pixels.append((y, x))
            for ny, nx in ((y + 1, x), (y - 1, x), (y, x + 1), (y, x - 1)):
                if 0 <= ny < labels.shape[1] and 0 <= nx < labels.shape[2] and labels[0, ny, nx] and not seen[ny, nx]:
                    seen[ny, nx] = True
                    stack.append((ny, nx))
        ys, xs = np.array(pixels).T
        kinds = {(int(labels[0, y, x]), int(labels[1, y, x])) for y, x in pixels}
        assert len(kinds) == 1, "two objects touch"
        c, s = kinds.pop()
        blobs.append({"color": colors[c - 1], "shape": shapes.SHAPES[s - 1], "x": xs.mean(), "y": ys.mean()})
    return blobs


def _named(blobs, phrase: str) -> list[dict]:
    """Blobs a phrase like 'red object', 'circle', 'red circle', 'red objects', 'circles' refers to."""
    words = phrase.split()
    color = next((w for w in words if w in shapes.COLORS), None)
    shape = next((s for s in shapes.SHAPES if s in words or s + "s" in words), None)
    return [b for b in blobs if (color is None or b["color"] == color) and (shape is None or b["shape"] == shape)]


def _answer_from_pixels(family: str, question: str, blobs) -> str:
    """Answer a generated question from the pixels, with rules written for this test from the question text."""
    q = question.rstrip("?")
    if family == "exist":
        thing = re.sub(r"^(is there (a|anything)|are there any|does the image contain a) ", "", q)
        return "yes" if _named(blobs, thing.replace(" object", "")) else "no"
    if family in ("query_color", "query_shape"):     # "what color is the circle", "which shape is red", ...
        matches = _named(blobs, " ".join(w for w in q.split() if w in shapes.COLORS or w in shapes.SHAPES))
        assert len(matches) == 1, f"ambiguous: {question}"
        return matches[0]["color" if family == "query_color" else "shape"]
    if family == "count":
        thing = re.sub(r"^(how many (things are )?|what is the number of )| (are there|can you see)$", "", q)
        return str(len(_named(blobs, thing)))
    if family == "compare":
        m = re.match(r"(?:are there|does the image have) (more|fewer) (.+) than (.+)", q)
        a, b = len(_named(blobs, m.group(2))), len(_named(blobs, m.group(3)))
        assert a != b, f"a tie: {question}"
        return "yes" if (a > b) == (m.group(1) == "more") else "no"
    m = re.search(r"(closest to|farthest from) the (.+?)(?: has|$)", q)
    refs = _named(blobs, m.group(2))
    assert len(refs) == 1, f"reference not unique: {question}"
    ref = refs[0]
    dist = sorted((math.hypot(b["x"] - ref["x"], b["y"] - ref["y"]), i) for i, b in enumerate(blobs) if b is not ref)
    first, second = (dist[0], dist[1]) if m.group(1) == "closest to" else (dist[-1], dist[-2])
    assert abs(first[0] - second[0]) >= 1.5, f"near tie: {question}"    # drawn centroids, clearly apart
    return blobs[first[1]]["color" if "color" in question else "shape"]


def test_generated_answers_match_what_is_drawn():
    """Every answer is read back from the pixel labels (not from the generator's object list) with rules of
    this test's own; each question names its objects unambiguously and relate questions have no near ties."""
    images, records, labels = shapes.generate_shapes_split(150, 6, seed=3)
    blobs = [_objects_in_pixels(lab) for lab in labels]
    assert all(3 <= len(b) <= 6 for b in blobs)
    for r in records:
        assert r["answers"] == [_answer_from_pixels(r["family"], r["question"], blobs[r["image_index"]])], r


def _cell_holds(cell: int, blob: dict, slack: float = 3.0) -> bool:
    """Whether a FACT_GRID cell (8 px at 64 px) lies within `slack` px of a blob's centroid (a triangle's
    centroid sits a little below the centre the generator places)."""
    size = 64 / shapes.FACT_GRID
    row, col = divmod(cell, shapes.FACT_GRID)
    return (col * size - slack <= blob["x"] <= (col + 1) * size + slack
            and row * size - slack <= blob["y"] <= (row + 1) * size + slack)


def _nearest(blobs, cell: int) -> dict:
    """The blob whose centroid is nearest the centre of a FACT_GRID cell."""
    size, (row, col) = 64 / shapes.FACT_GRID, divmod(cell, shapes.FACT_GRID)
    return min(blobs, key=lambda o: math.hypot(o["x"] - (col + 0.5) * size, o["y"] - (row + 0.5) * size))


def test_scene_facts_match_what_is_drawn():
    """Each question's scene facts, read back from the pixels: count, the count asked; compare, the counts of
    the first- and second-named groups; relate, the cells of the reference and of the answer's object.
    Other families carry none, and the facts' table marks the missing ones -1."""
    images, records, labels = shapes.generate_shapes_split(150, 6, seed=3)
    blobs = [_objects_in_pixels(lab) for lab in labels]
    for r in records:
        facts, b, q = r["facts"], blobs[r["image_index"]], r["question"].rstrip("?")
        if r["family"] == "count":
            assert facts == {"first_count": int(r["answers"][0])}
        elif r["family"] == "compare":
            m = re.match(r"(?:are there|does the image have) (?:more|fewer) (.+) than (.+)", q)
            assert facts == {"first_count": len(_named(b, m.group(1))), "second_count": len(_named(b, m.group(2)))}
        elif r["family"] == "relate":
            ref = _named(b, re.search(r"(?:closest to|farthest from) the (.+?)(?: has|$)", q).group(1))[0]
            assert _cell_holds(facts["reference"], ref), (r, ref)
            assert _cell_holds(facts["target"], _nearest(b, facts["target"])), (r, b)
            attr = "color" if "color" in q else "shape"
            assert [_nearest(b, facts["target"])[attr]] == r["answers"], (r, b)
        else:
            assert facts == {}
    table = data.fact_table(records)
    assert table.shape == (len(records), len(data.FACTS))
    assert ((table >= 0).sum(dim=1) == torch.tensor([len(r["facts"]) for r in records])).all()


def test_count_answers_are_as_the_readme_says():
    _, records, _ = shapes.generate_shapes_split(600, 6, seed=4)
    counts = Counter(r["answers"][0] for r in records if r["family"] == "count")
    share = {k: v / sum(counts.values()) for k, v in counts.items()}
    assert set(share) <= {"0", "1", "2", "3", "4", "5", "6"}
    assert share["0"] + share["1"] + share["2"] > 0.8 and share["3"] > 0.05


def test_families_balanced_and_yes_no_balanced():
    _, records, _ = shapes.generate_shapes_split(600, 4, seed=1)
    fams = [r["family"] for r in records]
    for fam in data.FAMILIES:
        assert abs(fams.count(fam) / len(fams) - 1 / 6) < 0.02
    for fam in ["exist", "compare"]:
        answers = [r["answers"][0] for r in records if r["family"] == fam]
        assert 0.42 < answers.count("yes") / len(answers) < 0.58


def test_shapes_splits_are_disjoint():
    """Four splits, no image id or image in two of them; the calibration split's scenes are none of stage 1's
    (an epoch's fresh scenes), and drawing it changes no other split."""
    cfg = DataConfig(train_images=10, val_images=10, test_images=10, calib_images=10)
    splits = data.shapes_splits(cfg, only=data.SPLITS)
    assert list(splits) == ["train", "val", "test", "calib"]
    ids = [{r["image_id"] for r in recs} for _, recs, _ in splits.values()]
    assert all(not (a & b) for i, a in enumerate(ids) for b in ids[i + 1:])
    images = [{img.tobytes() for img in split[0]} for split in splits.values()]
    assert all(not (a & b) for i, a in enumerate(images) for b in images[i + 1:])
    stage1 = {img.tobytes() for epoch in range(1, 61) for img in shapes.fresh_scenes(cfg, epoch)[0]}
    assert not (images[3] & stage1)
    assert all(np.array_equal(splits[name][0], data.shapes_splits(cfg)[name][0]) for name in ("train", "val", "test"))


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


# The fixture's five answer sets, scored by hand with the official rules (predictions not listed score 0):
# 'red' x6, 'Red', 'red!', 'dark red', 'maroon' -> red 8 humans; 'the dog'/'a dog'/'dog' -> dog 5, cat 3, ...
HAND_SCORES = {
    "What color is the bus?": {"red": 1.0, "dark red": 0.3, "maroon": 0.3},
    "Is the man smiling?": {"yes": 1.0},
    "What is on the table?": {"dog": 1.0, "cat": 0.9, "dogs": 0.3, "plate": 0.3},
    "Is it raining?": {"no": 1.0, "yes": 0.9},
    "What animal is this?": {"cat": 1.0, "kitten": 1.0},
    "How many dogs are there?": {"2": 1.0, "3": 0.6},
}


def test_vqa2_loader_splits_by_image_and_scores_officially():
    splits, tok, answers = data.load_data(vqa_cfg(), only=data.SPLITS)
    sizes = {k: len({r["image_id"] for r in s.records}) for k, s in splits.items()}
    assert sizes == {"train": 16, "val": 1, "test": 2, "calib": 1}     # 80 / 5 / 10 / 5 % of 20 images
    assert splits["train"].images.shape[1:] == (3, 32, 32)
    assert "2" in answers and "two" not in answers and "dog" in answers
    for split in splits.values():
        for i, r in enumerate(split.records):
            for a in answers:
                pred = torch.tensor([answers.index(a)])
                expected = HAND_SCORES[r["question"]].get(a, 0.0)
                assert split.score(torch.tensor([i]), pred).item() == pytest.approx(expected), (r["question"], a)


def test_vqa2_split_is_deterministic():
    a, _, _ = data.load_data(vqa_cfg())
    b, _, _ = data.load_data(vqa_cfg())
    assert [r["question_id"] for r in a["test"].records] == [r["question_id"] for r in b["test"].records]


def test_written_shapes_round_trip_through_vqa2_loader(tmp_path):
    cfg = DataConfig(train_images=20, val_images=5, test_images=5, questions_per_image=3)
    data.write_vqa_format(cfg, str(tmp_path))
    splits, _, answers = data.load_data(vqa_cfg(vqa_questions=str(tmp_path / "questions.json"),
                                                vqa_annotations=str(tmp_path / "annotations.json"),
                                                vqa_images=str(tmp_path / "images"), image_size=64), only=data.SPLITS)
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


def test_questions_without_their_image_are_skipped_and_counted(tmp_path, capsys):
    d = _copy_fixture(tmp_path)
    os.remove(d / "images" / "COCO_val2014_000000000003.jpg")
    splits, _, _ = data.load_data(vqa_cfg(vqa_images=str(d / "images")), only=data.SPLITS)
    assert sum(len(s) for s in splits.values()) == 38
    assert "2 of 40 questions have no image" in capsys.readouterr().out
    for name in os.listdir(d / "images"):
        os.remove(d / "images" / name)
    with pytest.raises(DataError, match="no question has its image there"):
        data.load_data(vqa_cfg(vqa_images=str(d / "images")))


def test_unanimous_unnormalised_answers_are_trained_as_the_metric_scores_them(tmp_path):
    """Where all ten humans answer 'Two', the official metric credits 'Two' only (it normalises nothing then):
    the vocabulary holds 'Two' and the training target is 'Two', not the normalised '2' that would score 0."""
    d = _copy_fixture(tmp_path)
    ann = json.loads((d / "annotations.json").read_text())
    for a in ann["annotations"]:
        a["answers"] = [{"answer": "Two"}] * 10 if a["question_id"] % 2 else a["answers"]
    (d / "annotations.json").write_text(json.dumps(ann))
    splits, _, answers = data.load_data(vqa_cfg(vqa_annotations=str(d / "annotations.json")))
    train = splits["train"]
    odd = [i for i, r in enumerate(train.records) if r["question_id"] % 2]
    targets = train.soft_targets(torch.tensor(odd), len(answers))
    assert "Two" in answers and (targets.argmax(1) == answers.index("Two")).all()
    assert (train.score(torch.tensor(odd), targets.argmax(1)) == 1.0).all()
    if "2" in answers:
        assert (train.score(torch.tensor(odd), torch.full((len(odd),), answers.index("2"))) == 0.0).all()


def test_undecodable_image(tmp_path):
    d = _copy_fixture(tmp_path)
    (d / "images" / "4.png").write_bytes(b"this is not a png")
    with pytest.raises(DataError, match="cannot decode image .*4.png"):
        data.load_data(vqa_cfg(vqa_images=str(d / "images")))


def test_scene_command_draws_a_scene_and_prints_its_questions_and_answers(tmp_path, capsys):
    """python data.py --scene PNG: the image and one question of each family about it, with the answers the
    generator gives for that seed."""
    data.main(["--scene", str(tmp_path / "scene.png"), "--seed", "3"])
    image, _, qas = shapes.make_image_with_questions(np.random.default_rng(3), data.FAMILIES)
    assert np.array_equal(np.array(Image.open(tmp_path / "scene.png")), image)
    printed = capsys.readouterr().out
    assert all(f"  {fam}: {q} -> {a}" in printed for fam, q, a, _ in qas) and len(qas) == len(data.FAMILIES)
    with pytest.raises(SystemExit) as e:
        data.main([])
    assert e.value.code == 2


def test_scene_command_writes_an_enlarged_copy_and_names_a_missing_folder(tmp_path, capsys):
    data.main(["--scene", str(tmp_path / "s.png"), "--seed", "3"])
    small, large = Image.open(tmp_path / "s.png"), Image.open(tmp_path / "s_x4.png")
    assert large.size == (4 * small.size[0], 4 * small.size[1])
    assert np.array_equal(np.array(large)[::4, ::4], np.array(small))              # the same pixels, bigger
    with pytest.raises(SystemExit) as e:
        data.main(["--scene", str(tmp_path / "nope" / "s.png")])
    missing = tmp_path / "nope"
    assert e.value.code == 2 and capsys.readouterr().err == f"error: --scene {missing / 's.png'}: folder {missing} not found\n"
