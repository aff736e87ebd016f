"""The data FREE is trained and measured on: what a split holds, the tokenizer and the answer
vocabulary, splits and batches, and the question families.

The paper evaluates FREE on VQAv2 (and other VL tasks) with a frozen BLIP-2. We train a miniature
VLM from scratch, so we also need data a laptop can learn in minutes:

* `shapes` (default): 64x64 images of 3-6 coloured shapes, with questions in six FAMILIES of graded
  difficulty (exist, query_color, query_shape, count, compare, relate), made by util/shapes.py,
  deterministic by seed, no files needed. `family` plays the role of VQA's question type.
* `vqa2`: questions/annotations/images in the official VQA v2 format (util/vqa.py, which also holds
  the official accuracy), split by image id 80/5/5/10 into train/val/calib/test; questions are
  grouped by answer type.

Both become a `Split`: images (uint8), tokenized questions, and per question the official score of
every vocabulary answer that earns credit (the evaluation, and the soft training target).

`python data.py --write DIR` writes the shapes set in VQA v2 format (questions JSON, annotations
JSON, PNG images), which `python train.py --data vqa2 --vqa-questions DIR/questions.json
--vqa-annotations DIR/annotations.json --vqa-images DIR/images` reads through the real-data path;
`python data.py --scene PNG` draws one scene and asks each family about it.

Public: DataConfig, check_data_config, SPLITS, FAMILIES, FACTS, Split, load_data, batches,
majority_baseline, train_tokenizer, encode_questions, build_answer_vocab, make_split, DataError.
"""
import argparse
import os
import sys
from collections import Counter
from dataclasses import dataclass, field

import numpy as np
import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors

from util.config import flag, DataError, Parser
from util.shapes import FACTS, FAMILIES, draw_scene, shapes_splits
from util.vqa import official_score_table, vqa2_splits, write_vqa_format


@dataclass
class DataConfig:
    # dataset: shapes (built-in, generated) or vqa2 (VQA v2 files)
    data: str = field(default="shapes", metadata={"choices": ["shapes", "vqa2"]})
    data_seed: int = 0  # seed of the shapes generator and of the vqa2 image split
    image_size: int = 64  # images are (resized to) image_size x image_size RGB
    # shapes: training images per epoch (new scenes every epoch of stage 1)
    train_images: int = 6000
    val_images: int = 600  # shapes: validation images
    test_images: int = 600  # shapes: test images
    # shapes: calibration images (early exit's threshold is certified on them and chosen nothing
    # else; the guarantee tightens with their number, see infer.calibrate)
    calib_images: int = 2400
    questions_per_image: int = 4  # shapes: questions asked about each image
    vqa_questions: str = ""  # vqa2: questions JSON file (official format)
    vqa_annotations: str = ""  # vqa2: annotations JSON file (official format)
    vqa_images: str = ""  # vqa2: folder of images named *{image_id:012d}.* or {image_id}.*
    vqa_max_questions: int = 0  # vqa2: use only the first N questions (0 = all)
    # answer vocabulary: the most frequent train answers, at most this many (the usual VQA
    # classification setting)
    num_answers: int = 1000
    max_question_len: int = 24  # question tokens kept, [CLS] and [SEP] included
    tokenizer_vocab: int = 2000  # WordPiece vocabulary of the question tokenizer
    # 0 = stretch to a square; > 0 = timm's resize and centre crop (from a --vit encoder)
    crop_pct: float = field(default=0.0, metadata={"flag": False})
    interpolation: str = field(default="bilinear", metadata={"flag": False})  # resize interpolation


def check_data_config(cfg: DataConfig) -> None:
    """Refuse data settings that cannot work, naming the flag (DataError), before anything is
    generated or read. (Whether the VQA v2 files parse is checked when they are read, also before
    training.)"""
    sizes = ("image_size", "train_images", "val_images", "test_images", "calib_images",
             "num_answers", "tokenizer_vocab")
    for name in sizes:
        if getattr(cfg, name) < 1:
            raise DataError(f"{flag(name)} must be at least 1 "
                            f"(got {getattr(cfg, name)})")
    if not 1 <= cfg.questions_per_image <= len(FAMILIES):
        raise DataError(f"--questions-per-image must be between 1 and {len(FAMILIES)} (one per "
                        f"question family; got {cfg.questions_per_image})")
    if cfg.max_question_len < 3:
        raise DataError(f"--max-question-len must be at least 3 ([CLS], one word, [SEP]; got "
                        f"{cfg.max_question_len})")
    if cfg.vqa_max_questions < 0:
        raise DataError(f"--vqa-max-questions must be >= 0 (0 = all; got {cfg.vqa_max_questions})")
    if cfg.data == "vqa2":
        check_vqa_files(cfg)


def check_vqa_files(cfg: DataConfig) -> None:
    """--data vqa2: the questions' and annotations' files and the images' folder exist."""
    for flag, value in (("--vqa-questions", cfg.vqa_questions),
                        ("--vqa-annotations", cfg.vqa_annotations)):
        if not value:
            raise DataError(f"--data vqa2 needs {flag} FILE")
        if not os.path.isfile(value):
            raise DataError(f"{flag} {value}: file not found")
    if not cfg.vqa_images:
        raise DataError("--data vqa2 needs --vqa-images DIR")
    if not os.path.isdir(cfg.vqa_images):
        raise DataError(f"--vqa-images {cfg.vqa_images}: directory not found")




# The splits and what each one decides (no split decides two things):
#   train   the weights (stage 1 draws new scenes every epoch, fresh_scenes)
#   val     every choice a person or a schedule makes: epochs, exit placement, family sampling,
#           the exit rule's defaults
#   calib   only the early-exit threshold that infer.calibrate certifies (Learn-then-Test assumes
#           its calibration data chose nothing else)
#   test    nothing: it is reported once
SPLITS = ("train", "val", "test", "calib")


# --------------------------------------------------------------------------------------------------
# Tokenizer, answer vocabulary and the tensors the model eats
# --------------------------------------------------------------------------------------------------
SPECIAL_TOKENS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"]


def train_tokenizer(questions: list[str], vocab_size: int, max_len: int) -> Tokenizer:
    """WordPiece tokenizer fitted on the train-split questions. encode() gives [CLS] q [SEP]
    [PAD]...

    The vocabulary: the special tokens, every character seen (alone and as a '##' continuation,
    so an unseen word still splits into known pieces), then whole words by frequency (ties
    alphabetical) up to vocab_size. NOTE (deviation): tokenizers' WordPieceTrainer breaks
    frequency ties in hash-map order, so its vocabulary changes from run to run; counting words
    ourselves keeps runs reproducible."""
    normalizer, pre = normalizers.BertNormalizer(lowercase=True), pre_tokenizers.BertPreTokenizer()
    counts = Counter(w for q in questions
                     for w, _ in pre.pre_tokenize_str(normalizer.normalize_str(q)))
    chars = sorted({c for w in counts for c in w})
    vocab = SPECIAL_TOKENS + chars + ["##" + c for c in chars]
    words = [w for w, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if w not in vocab]
    vocab += words[:max(0, vocab_size - len(vocab))]
    tok = Tokenizer(models.WordPiece({t: i for i, t in enumerate(vocab)}, unk_token="[UNK]"))
    tok.normalizer, tok.pre_tokenizer = normalizer, pre
    cls_id, sep_id = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    specials = [("[CLS]", cls_id), ("[SEP]", sep_id)]
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]",
                                                       special_tokens=specials)
    tok.enable_truncation(max_length=max_len)
    tok.enable_padding(pad_id=tok.token_to_id("[PAD]"), pad_token="[PAD]", length=max_len)
    return tok


def encode_questions(tok: Tokenizer, questions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns token ids (n, T) int64 and the text mask (n, T) bool, True = real token."""
    enc = tok.encode_batch(questions)
    ids = torch.tensor([e.ids for e in enc], dtype=torch.long)
    mask = torch.tensor([e.attention_mask for e in enc], dtype=torch.bool)
    return ids, mask


def build_answer_vocab(train_records: list[dict], num_answers: int) -> list[str]:
    """The answers that earn credit most often on train, as the official metric compares them (a
    normalised answer, or the raw one where all humans agree), ties broken alphabetically
    (deterministic)."""
    counts = Counter(key for r in train_records for key in official_score_table(r["answers"])[0])
    counts.pop("", None)
    return [a for a, _ in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:num_answers]]


def _score_rows(records: list[dict], answer_to_idx: dict[str, int]):
    """Per question, the (answer index, official score) pairs of every vocabulary answer that
    earns credit, padded to (n, M) (index -1 = none). The same table is the soft training target
    and the evaluation: training aims at what the official metric rewards (where all humans agree
    on 'Two', that is 'Two')."""
    rows = [sorted((answer_to_idx[k], s) for k, s in official_score_table(r["answers"])[0].items()
                   if k in answer_to_idx) for r in records]
    idx = torch.full((len(rows), max(1, max(map(len, rows)))), -1, dtype=torch.long)
    score = torch.zeros(idx.shape)
    for i, pairs in enumerate(rows):
        for j, (a, s) in enumerate(pairs):
            idx[i, j], score[i, j] = a, s
    return idx, score


@dataclass
class Split:
    """One split as tensors. n questions over n_img images; M = most scored answers of any
    question."""
    images: torch.Tensor        # (n_img, 3, H, W) uint8
    image_index: torch.Tensor   # (n,) long: the image of each question
    tokens: torch.Tensor        # (n, T) long: [CLS] question [SEP] [PAD]...
    text_mask: torch.Tensor     # (n, T) bool: True = real token
    answer_idx: torch.Tensor    # (n, M) long: vocabulary answers that earn credit (-1 = none)
    # (n, M) float: their official score, 0..1 (also the soft training target)
    answer_score: torch.Tensor
    records: list               # the question records (question, answers, family, ids)
    # (n_img, 2, H, W) uint8 colour/shape + 1 (shapes only)
    pixel_labels: torch.Tensor | None = None
    # (n_img, P, Dv) float16: a frozen encoder's tokens, computed once
    patches: torch.Tensor | None = None
    # (n, len(FACTS)) long: each question's scene facts, -1 = none
    facts: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.records)

    @property
    def families(self) -> list[str]:
        return [r["family"] for r in self.records]

    def trainable(self) -> torch.Tensor:
        """(n,) bool: questions with some answer inside the vocabulary (others are only
        evaluated)."""
        return (self.answer_idx >= 0).any(dim=1)

    def batch(self, ids: torch.Tensor, raw_images: bool = False) -> dict:
        """Model inputs for questions `ids`: images float (B, 3, H, W) in [0, 1], tokens (B, T),
        mask (B, T); where a frozen encoder's tokens are at hand (and not raw_images), 'patches'
        (B, P, Dv) instead."""
        inputs = {"images": None, "tokens": self.tokens[ids], "text_mask": self.text_mask[ids]}
        if self.patches is not None and not raw_images:
            return inputs | {"patches": self.patches[self.image_index[ids]].float()}    # (B, P, Dv)
        images = self.images[self.image_index[ids]].contiguous().float() / 255.0  # (B, 3, H, W)
        return inputs | {"images": images}

    def soft_targets(self, ids: torch.Tensor, num_answers: int) -> torch.Tensor:
        """Dense soft targets (B, A) from the stored (index, score) pairs."""
        idx, score = self.answer_idx[ids], self.answer_score[ids]        # (B, M)
        dense = torch.zeros(len(ids), num_answers + 1)
        dense.scatter_(1, idx % (num_answers + 1), score)           # -1 lands in the spare column A
        return dense[:, :num_answers]                                    # (B, A)

    def score(self, ids: torch.Tensor, pred: torch.Tensor) -> torch.Tensor:
        """Official VQA accuracy (0..1) of predicted answer indices pred (B,) for questions ids
        (B,)."""
        hit = self.answer_idx[ids] == pred[:, None]                      # (B, M)
        return (self.answer_score[ids] * hit).sum(dim=1)


def fact_table(records: list[dict]) -> torch.Tensor | None:
    """(n, len(FACTS)) long: the scene facts of each question (-1 where it has none of that
    kind), or None for data without scene facts (VQA v2)."""
    if not any("facts" in r for r in records):
        return None
    rows = [[r.get("facts", {}).get(name, -1) for name in FACTS] for r in records]
    return torch.tensor(rows, dtype=torch.long)                                 # (n, len(FACTS))


def make_split(images: np.ndarray, records: list[dict], labels: np.ndarray | None, tok: Tokenizer,
               answer_to_idx: dict[str, int]) -> Split:
    tokens, text_mask = encode_questions(tok, [r["question"] for r in records])
    answer_idx, answer_score = _score_rows(records, answer_to_idx)
    # (n_img, 3, H, W): a view of the drawn array (channels last in memory), so the split holds no
    # second copy of its images; batch() makes each batch's contiguous
    return Split(
        images=torch.from_numpy(images).permute(0, 3, 1, 2),
        image_index=torch.tensor([r["image_index"] for r in records], dtype=torch.long),
        tokens=tokens,
        text_mask=text_mask,
        answer_idx=answer_idx,
        answer_score=answer_score,
        records=records,
        pixel_labels=None if labels is None else torch.from_numpy(labels),
        facts=fact_table(records),
    )


def load_data(cfg: DataConfig, tokenizer: Tokenizer | None = None, answers: list[str] | None = None,
              only: tuple[str, ...] = ("train", "val", "test")):
    """Build (splits, tokenizer, answers). Pass a checkpoint's tokenizer and answers to reuse
    them; otherwise both are fitted on the train split. `only`: the splits wanted (shapes data
    makes just those; without "train", pass the tokenizer and answers)."""
    if "train" not in only and (tokenizer is None or answers is None):
        raise ValueError(
            "load_data without the train split needs the tokenizer and answers it was trained with")
    raw = shapes_splits(cfg, only) if cfg.data == "shapes" else vqa2_splits(cfg, only)
    if tokenizer is None:
        tokenizer = train_tokenizer([r["question"] for r in raw["train"][1]], cfg.tokenizer_vocab,
                                    cfg.max_question_len)
    if answers is None:
        answers = build_answer_vocab(raw["train"][1], cfg.num_answers)
    answer_to_idx = {a: i for i, a in enumerate(answers)}
    splits = {name: make_split(images, records, labels, tokenizer, answer_to_idx)
              for name, (images, records, labels) in raw.items()}
    return splits, tokenizer, answers


def batches(n: int, batch_size: int, shuffle: bool = False,
            generator: torch.Generator | None = None):
    """Index batches over range(n) (or a shuffled order)."""
    order = torch.randperm(n, generator=generator) if shuffle else torch.arange(n)
    for start in range(0, n, batch_size):
        yield order[start:start + batch_size]


def majority_baseline(train: Split, evaluated: Split) -> dict[str, float]:
    """Per family: official accuracy (%) of always giving that family's most common train answer."""
    out = {}
    for fam in sorted(set(evaluated.families)):
        best = Counter(int(train.answer_idx[i, train.answer_score[i].argmax()])
                       for i, f in enumerate(train.families) if f == fam).most_common(1)
        ids = torch.tensor([i for i, f in enumerate(evaluated.families) if f == fam])
        if not best:                                         # no train question of this family
            out[fam] = 0.0
            continue
        answer = torch.full((len(ids),), best[0][0])                                     # (n_fam,)
        out[fam] = 100.0 * evaluated.score(ids, answer).mean().item()
    return out


def main(argv=None) -> None:
    p = Parser(description="The built-in shapes data from the command line: one scene to ask "
                           "about, or the whole set in the VQA v2 file format.",
               formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--scene", metavar="PNG", help="draw one scene into this PNG file and print a "
                   "question of each family about it, with its answer")
    p.add_argument("--write", metavar="DIR",
                   help="write the set in VQA v2 format (questions.json, annotations.json, "
                        "images/)")
    for name, default in [("train-images", 400), ("val-images", 50), ("test-images", 50)]:
        p.add_argument(f"--{name}", type=int, default=default,
                       help=f"--write: number of {name.split('-')[0]} images")
    p.add_argument("--questions-per-image", type=int, default=4,
                   help="--write: questions per image")
    p.add_argument("--seed", type=int, default=0, help="generator seed")
    args = p.parse_args(argv)
    if bool(args.scene) == bool(args.write):
        p.error("give --scene PNG or --write DIR")
    cfg = DataConfig(train_images=args.train_images, val_images=args.val_images,
                     test_images=args.test_images, questions_per_image=args.questions_per_image,
                     data_seed=args.seed)
    try:
        check_data_config(cfg)
        if args.scene:
            return draw_scene(args.scene, args.seed)
        write_vqa_format(cfg, args.write)
    except (DataError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2)
    n = args.train_images + args.val_images + args.test_images
    print(f"wrote {n} images and {n * args.questions_per_image} questions to {args.write}")


if __name__ == "__main__":
    main()
