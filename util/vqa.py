"""Real VQA v2 data, and the official VQA accuracy.

* the files: questions and annotations JSON in the official format, and a folder of images (COCO
  names or plain ids), split by image id 80/5/5/10 into train/val/calib/test; a user's own image,
  resized and cropped as the encoder expects (timm's transform where --vit names a timm model);
* the official metric: answers normalised as the VQA evaluation script does, and an answer's
  accuracy min(1, #humans who gave it / 3) averaged over the 10 choose-9 subsets of annotators;
* the shapes set written in the VQA v2 format (data.py --write), which the real-data path reads.

Public: vqa_accuracy, normalize_answer, official_score_table, vqa2_splits, load_image,
write_vqa_format.
"""
import json
import os
import re
from collections import Counter

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from util.config import DataError
from util.shapes import shapes_splits


# --------------------------------------------------------------------------------------------------
# The official VQA v2 answer normalization and accuracy (GT-Vision-Lab/VQA, vqaEval.py)
# --------------------------------------------------------------------------------------------------
# The official table, entry for entry, quirks included: answers are lowercased before the lookup, so
# its capitalised keys ("Im", "Ive", "Id've", "I'dve") never match ("im" stays "im"); "let's" and
# "she's" map to themselves (so "lets" and "shes" stay as they are) and "somebody'd" maps to
# "somebodyd".
_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've",
    "couldnt": "couldn't", "couldn'tve": "couldn't've", "couldnt've": "couldn't've",
    "didnt": "didn't", "doesnt": "doesn't", "dont": "don't", "hadnt": "hadn't",
    "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't", "havent": "haven't",
    "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "Id've": "I'd've", "I'dve": "I'd've", "Im": "I'm",
    "Ive": "I've", "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've",
    "itll": "it'll", "let's": "let's", "maam": "ma'am", "mightnt": "mightn't",
    "mightnt've": "mightn't've", "mightn'tve": "mightn't've", "mightve": "might've",
    "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've",
    "she's": "she's", "shouldve": "should've", "shouldnt": "shouldn't",
    "shouldnt've": "shouldn't've", "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd",
    "somebodyd've": "somebody'd've", "somebody'dve": "somebody'd've", "somebodyll": "somebody'll",
    "somebodys": "somebody's", "someoned": "someone'd", "someoned've": "someone'd've",
    "someone'dve": "someone'd've", "someonell": "someone'll", "someones": "someone's",
    "somethingd": "something'd", "somethingd've": "something'd've",
    "something'dve": "something'd've", "somethingll": "something'll", "thats": "that's",
    "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've",
    "twas": "'twas", "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've",
    "werent": "weren't", "whatll": "what'll", "whatre": "what're", "whats": "what's",
    "whatve": "what've", "whens": "when's", "whered": "where'd", "wheres": "where's",
    "whereve": "where've", "whod": "who'd", "whod've": "who'd've", "who'dve": "who'd've",
    "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll", "whyre": "why're",
    "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all",
    "yall'll": "y'all'll", "y'allll": "y'all'll", "yall'd've": "y'all'd've",
    "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've", "youd": "you'd", "youd've": "you'd've",
    "you'dve": "you'd've", "youll": "you'll", "youre": "you're", "youve": "you've"
}
_NUMBER_WORDS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10"
}
_ARTICLES = {"a", "an", "the"}
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=",
          "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_COMMA_BETWEEN_DIGITS = re.compile(r"(\d)(,)(\d)")
# NOTE: the official regex is "(?!<=\d)(\.)(?!\d)": its look-behind is mistyped, so in effect a
# period is dropped unless a digit follows it. The official call is periodStrip.sub("", text,
# re.UNICODE), where re.UNICODE (= 32) lands in the `count` argument: at most 32 periods are
# dropped. We keep both quirks.
_PERIOD_STRIP = re.compile(r"(?!<=\d)(\.)(?!\d)")
_PERIOD_STRIP_COUNT = int(re.UNICODE)


def _process_punctuation(text: str) -> str:
    """Official step 3: punctuation touching a space (or any, when a digit,digit pattern exists) is
    deleted, other punctuation becomes a space; then periods not followed by a digit are dropped."""
    out = text
    for p in _PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_BETWEEN_DIGITS.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    return _PERIOD_STRIP.sub("", out, count=_PERIOD_STRIP_COUNT)


def _process_digit_article(text: str) -> str:
    """Official step 4: lowercase, number words -> digits, drop articles, restore contractions."""
    words = [_NUMBER_WORDS.get(w, w) for w in text.lower().split()]
    words = [_CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES]
    return " ".join(words)


def _clean(text: str) -> str:
    """Official step 1: newlines and tabs become spaces, then strip."""
    return text.replace("\n", " ").replace("\t", " ").strip()


def normalize_answer(text: str) -> str:
    """The full official normalization (steps 1, 3, 4): what a human answer means, e.g. 'Two' ->
    '2'."""
    return _process_digit_article(_process_punctuation(_clean(text)))


def official_score_table(answers: list[str]) -> tuple[dict[str, float], bool]:
    """Scores of every prediction that earns credit on a question, as the official metric gives
    them.

    Returns (table, unanimous). The keys are raw stripped answers when all humans agree (the
    official script then does no normalization), else normalized answers. With 10 answers (every VQA
    v2 question) the score of a prediction matching k of them is the official one: the mean over the
    10 leave-one-out subsets of min(1, matches / 3), i.e. k = 1 -> 0.3, 2 -> 0.6, 3 -> 0.9, 4+ -> 1.
    """
    cleaned = [_clean(a) for a in answers]
    unanimous = len(set(cleaned)) <= 1
    keys = cleaned if unanimous else [normalize_answer(a) for a in cleaned]
    n = len(keys)
    table = {}
    for key, k in Counter(keys).items():
        if n == 10:
            # leave-one-out: k subsets lose a match (k-1 left), 10-k subsets keep all k
            table[key] = (k * min(1.0, (k - 1) / 3) + (n - k) * min(1.0, k / 3)) / n
        else:
            # NOTE (deviation): the official script assumes 10 answers. Its leave-one-out on n
            # answers caps the score below 1 for n < 4 and gives 0 to *every* prediction when n = 1,
            # so a data set with one answer per question (the built-in shapes set) could not be
            # scored at all. For n != 10 we give min(1, k / min(3, n)): full credit when min(3, n)
            # answers agree with the prediction (the official rule's "3 agreeing humans = right",
            # scaled down to fewer humans).
            table[key] = min(1.0, k / min(3, n))
    return table, unanimous


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """Official VQA accuracy (0..1) of one predicted answer against the human answers."""
    table, unanimous = official_score_table(answers)
    key = _clean(prediction) if unanimous else normalize_answer(prediction)
    return table.get(key, 0.0)


# --------------------------------------------------------------------------------------------------
# Real VQA v2 files
# --------------------------------------------------------------------------------------------------
def _load_json(path: str, flag: str, top_key: str, keys: list[str]) -> list[dict]:
    if not path:
        raise DataError(f"--data vqa2 needs {flag} FILE")
    try:
        with open(path) as f:
            obj = json.load(f)
    except FileNotFoundError:
        raise DataError(f"{flag} {path}: file not found")
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{flag} {path}: cannot read file ({e.__class__.__name__}: {e})")
    except json.JSONDecodeError as e:
        raise DataError(f"{flag} {path}: malformed JSON ({e})")
    if not isinstance(obj, dict) or not isinstance(obj.get(top_key), list):
        raise DataError(f"{flag} {path}: expected a JSON object with a list under '{top_key}'")
    for i, item in enumerate(obj[top_key]):
        missing = [k for k in keys if not isinstance(item, dict) or k not in item]
        if missing:
            raise DataError(
                f"{flag} {path}: entry {i} of '{top_key}' is missing key '{missing[0]}'")
    return obj[top_key]


_IMAGE_NAME = re.compile(r"^(?:.*?(\d{12})|(\d+))\.[A-Za-z0-9]+$")


def _index_images(image_dir: str) -> dict[int, str]:
    """image_id -> path for files named *{image_id:012d}.* (COCO) or {image_id}.*"""
    if not image_dir:
        raise DataError("--data vqa2 needs --vqa-images DIR")
    if not os.path.isdir(image_dir):
        raise DataError(f"--vqa-images {image_dir}: directory not found")
    index = {}
    for name in os.listdir(image_dir):
        m = _IMAGE_NAME.match(name)
        if m:
            index[int(m.group(1) or m.group(2))] = os.path.join(image_dir, name)
    return index


def load_image(path: str, image_size: int, crop_pct: float = 0.0,
               interpolation: str = "bilinear") -> torch.Tensor:
    """Decode an image file to uint8 (3, image_size, image_size) RGB; DataError if it cannot be
    decoded. crop_pct = 0: stretched to the square (the built-in encoder); crop_pct > 0: timm's
    eval transform for a timm encoder (resize the shorter side to image_size / crop_pct, centre
    crop), without its final ToTensor/Normalize: the model normalises with the encoder's mean and
    std."""
    try:
        with Image.open(path) as im:
            rgb = im.convert("RGB")
            if crop_pct > 0:
                rgb = timm_resize_crop(image_size, crop_pct, interpolation)(rgb)
            img = torch.from_numpy(np.array(rgb)).permute(2, 0, 1)  # (3, H, W) uint8
    except (UnidentifiedImageError, OSError, ValueError) as e:
        raise DataError(f"cannot decode image {path}: {str(e).splitlines()[0]}")
    if img.shape[1:] == (image_size, image_size):
        return img.contiguous()
    img = F.interpolate(
        img[None].float(),
        size=(image_size, image_size),
        mode="bilinear",
        antialias=True,
        align_corners=False,
    )  # (1, 3, S, S)
    return img[0].round().clamp(0, 255).to(torch.uint8)


def timm_resize_crop(image_size: int, crop_pct: float, interpolation: str):
    """The resize and crop steps of timm's eval transform (timm.data.create_transform) for this
    input size."""
    from timm.data import create_transform    # here: importing timm (and torchvision) takes seconds
    from torchvision import transforms
    steps = create_transform(input_size=(3, image_size, image_size), crop_pct=crop_pct,
                             interpolation=interpolation).transforms
    return transforms.Compose(
        [t for t in steps if type(t).__name__ not in ("MaybeToTensor", "ToTensor", "Normalize")])


def _vqa_records(cfg: "DataConfig") -> list[dict]:
    """Join questions and annotations (refusing empty questions and questions without answers)."""
    questions = _load_json(cfg.vqa_questions, "--vqa-questions", "questions",
                           ["question_id", "image_id", "question"])
    annotations = _load_json(cfg.vqa_annotations, "--vqa-annotations", "annotations",
                             ["question_id", "answers"])
    by_qid = {a["question_id"]: a for a in annotations}
    records = []
    for q in questions[:cfg.vqa_max_questions or None]:
        if not isinstance(q["question"], str) or not q["question"].strip():
            raise DataError(
                f"--vqa-questions {cfg.vqa_questions}: question {q['question_id']} is an empty"
                " string")
        ann = by_qid.get(q["question_id"])
        if ann is None:
            raise DataError(f"--vqa-annotations {cfg.vqa_annotations}: no annotation for question"
                            f" {q['question_id']}")
        answers = [a.get("answer", "") if isinstance(a, dict) else str(a) for a in ann["answers"]]
        if not answers:
            raise DataError(
                f"--vqa-annotations {cfg.vqa_annotations}: question {q['question_id']} has no"
                " answers")
        records.append({
            "question_id": q["question_id"],
            "image_id": q["image_id"],
            "question": q["question"],
            "answers": answers,
            "family": str(ann.get("answer_type", "all")),
        })
    if not records:
        raise DataError(f"--vqa-questions {cfg.vqa_questions}: no questions")
    return records


def vqa2_splits(cfg: "DataConfig", only: tuple[str, ...] = ("train", "val", "test")):
    """Load VQA v2 files; split by image id 80/5/5/10 into train/val/calib/test (deterministic by
    --data-seed), so that no image is in two splits; `only`: the splits whose images are read.
    Questions whose image is not in --vqa-images are skipped, and their number printed."""
    records, index = _vqa_records(cfg), _index_images(cfg.vqa_images)
    missing = [r for r in records if r["image_id"] not in index]
    if len(missing) == len(records):
        raise DataError(f"--vqa-images {cfg.vqa_images}: no question has its image there")
    if missing:
        print(f"note: {len(missing)} of {len(records)} questions have no image in {cfg.vqa_images} "
              f"(e.g. image_id {missing[0]['image_id']}); they are skipped")
    records = [r for r in records if r["image_id"] in index]
    ids = sorted({r["image_id"] for r in records})
    order = np.random.default_rng(cfg.data_seed).permutation(len(ids))
    rank = np.argsort(order)                                                  # each image's place
    # train 80 %, val 5 %, calib 5 % (the held-back images of val's 10 % before calib existed:
    # train and test keep their images), test 10 %
    ends = {"train": round(0.8 * len(ids)), "val": round(0.85 * len(ids)),
            "calib": round(0.9 * len(ids)), "test": len(ids)}
    split_of = {i: next(name for name, end in ends.items() if r < end) for i, r in zip(ids, rank)}
    splits = {}
    for name in only:
        recs = [dict(r) for r in records if split_of[r["image_id"]] == name]
        if not recs:
            raise DataError(f"--vqa-questions {cfg.vqa_questions}: the {name} split is empty: "
                            f"{len(records)} questions on {len(ids)} images were found, and the "
                            f"80/5/5/10 split by image needs at least 20 images")
        splits[name] = vqa_split_images(cfg, recs, index)
    return splits


def vqa_split_images(cfg: "DataConfig", recs: list[dict], index: dict[int, str]):
    """One split's (images uint8 (n_img, H, W, 3), records with their 'image_index', None)."""
    pos = {iid: i for i, iid in enumerate(sorted({r["image_id"] for r in recs}))}
    images = np.stack([load_image(index[iid], cfg.image_size, cfg.crop_pct, cfg.interpolation)
                       .permute(1, 2, 0).numpy() for iid in pos])              # (n_img, H, W, 3)
    for r in recs:
        r["image_index"] = pos[r["image_id"]]
    return images, recs, None


def write_vqa_format(cfg: "DataConfig", out_dir: str) -> None:
    """Write all three shapes splits as one VQA v2 set: questions.json, annotations.json,
    images/*.png."""
    os.makedirs(os.path.join(out_dir, "images"), exist_ok=True)
    questions, annotations = [], []
    for images, records, _ in shapes_splits(cfg).values():
        written = set()
        for r in records:
            if r["image_id"] not in written:
                Image.fromarray(images[r["image_index"]]).save(
                    os.path.join(out_dir, "images", f"shapes_{r['image_id']:012d}.png"))
                written.add(r["image_id"])
            questions.append({
                "image_id": r["image_id"],
                "question": r["question"],
                "question_id": r["question_id"],
            })
            a = r["answers"][0]
            annotations.append({
                "question_id": r["question_id"],
                "image_id": r["image_id"],
                "question_type": r["question_type"],
                "answer_type": r["answer_type"],
                "multiple_choice_answer": a,
                "answers": [{"answer": a, "answer_confidence": "yes", "answer_id": i + 1}
                            for i in range(10)],
            })
    with open(os.path.join(out_dir, "questions.json"), "w") as f:
        json.dump({"data_subtype": "shapes", "questions": questions}, f)
    with open(os.path.join(out_dir, "annotations.json"), "w") as f:
        json.dump({"data_subtype": "shapes", "annotations": annotations}, f)
