"""The built-in `shapes` VQA set: 64x64 images of 3-6 coloured shapes, and questions about them in
six families of graded difficulty (exist, query_color, query_shape, count, compare, relate);
deterministic by seed, no files needed. `family` plays the role of VQA's question type. Each image
also comes with pixel labels (colour and shape per pixel) and each question with the scene facts
behind its answer, which the stand-ins of stage 1 read (util/stand_ins.py).

Public: FAMILIES, COLORS, SHAPES, FACTS, fact_classes, make_scene, render_scene,
make_image_with_questions, generate_shapes_split, shapes_splits, fresh_scenes, draw_scene,
ANSWER_TYPES, GENERATORS, FACT_GRID, fact_cell, reference_names.
"""
import math
import os
from collections import Counter
from dataclasses import dataclass

import numpy as np
from PIL import Image

from util.config import DataError


# --------------------------------------------------------------------------------------------------
# The built-in `shapes` dataset
# --------------------------------------------------------------------------------------------------
COLORS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 230),
          "yellow": (235, 210, 30), "purple": (150, 60, 200), "cyan": (40, 200, 215)}
SHAPES = ["circle", "square", "triangle", "diamond"]
FAMILIES = ["exist", "query_color", "query_shape", "count", "compare", "relate"]
ANSWER_TYPES = {"exist": "yes/no", "compare": "yes/no", "count": "number",
                "query_color": "other", "query_shape": "other", "relate": "other"}
# object size r in pixels (see _shape_mask for what r means per shape)
MIN_SIZE, MAX_SIZE = 5.5, 8.5
# How far each shape reaches from its centre, in units of r (the radius of its circumscribed circle
# / r): a square's corners are at (+-0.8 r, +-0.8 r), a triangle's base corners at (+-r, 0.7 r).
# Objects are kept apart by these, so that no two shapes overlap or touch.
EXTENT = {
    "circle": 1.0,
    "square": 0.8 * math.sqrt(2),
    "triangle": math.sqrt(1 + 0.7**2),
    "diamond": 1.0,
}


@dataclass
class Obj:
    color: str
    shape: str
    x: float
    y: float
    r: float


def make_scene(rng: np.random.Generator, image_size: int = 64) -> list[Obj]:
    """3-6 objects at random (not grid-snapped) positions, random sizes, shapes, colours, at
    least 2 pixels apart (measured between the shapes' circumscribed circles) and inside the
    image."""
    scale = image_size / 64
    while True:
        n, objs = int(rng.integers(3, 7)), []
        for _ in range(200):
            color, shape = str(rng.choice(list(COLORS))), str(rng.choice(SHAPES))
            r = rng.uniform(MIN_SIZE, MAX_SIZE) * scale
            # every shape spans at most +-r in x and y
            x, y = rng.uniform(r + 1, image_size - r - 1, size=2)
            reach = EXTENT[shape] * r
            if all(math.hypot(x - o.x, y - o.y) > reach + EXTENT[o.shape] * o.r + 2 for o in objs):
                objs.append(Obj(color, shape, x, y, r))
                if len(objs) == n:
                    return objs


def _shape_mask(o: Obj, xx: np.ndarray, yy: np.ndarray) -> np.ndarray:
    """Pixels (by their centres xx, yy) covered by o: a circle of radius r, a square of half-side
    0.8 r, a diamond of half-diagonal r, or an upward triangle (apex r above the centre, base 0.7
    r below, half-width r)."""
    dx, dy = xx - o.x, yy - o.y
    if o.shape == "circle":
        return dx ** 2 + dy ** 2 <= o.r ** 2
    if o.shape == "square":
        return (np.abs(dx) <= 0.8 * o.r) & (np.abs(dy) <= 0.8 * o.r)
    if o.shape == "diamond":
        return np.abs(dx) + np.abs(dy) <= o.r
    # triangle pointing up: apex at y - r, base at y + 0.7 r, half-width grows linearly to r at the
    # base
    t = (dy + o.r) / (1.7 * o.r)
    return (t >= 0) & (t <= 1) & (np.abs(dx) <= t * o.r)


def render_scene(objs: list[Obj], rng: np.random.Generator, image_size: int = 64) -> np.ndarray:
    """Draw the scene on a plain or lightly noisy grey background. Returns uint8 (H, W, 3)."""
    yy, xx = np.mgrid[0:image_size, 0:image_size].astype(np.float32) + 0.5
    img = np.full((image_size, image_size, 3), rng.uniform(170, 230), dtype=np.float32)
    for o in objs:
        img[_shape_mask(o, xx, yy)] = np.array(COLORS[o.color], dtype=np.float32)
    img += rng.normal(0, rng.uniform(0, 6), size=img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def scene_labels(objs: list[Obj], image_size: int = 64) -> np.ndarray:
    """Per-pixel labels of a scene: uint8 (2, H, W) = (colour index + 1, shape index + 1), 0 =
    background. Used by stage 1's auxiliary patch loss (train.py), never by the VQA questions
    themselves."""
    yy, xx = np.mgrid[0:image_size, 0:image_size].astype(np.float32) + 0.5
    labels = np.zeros((2, image_size, image_size), dtype=np.uint8)
    colors = list(COLORS)
    for o in objs:
        m = _shape_mask(o, xx, yy)
        labels[0][m], labels[1][m] = colors.index(o.color) + 1, SHAPES.index(o.shape) + 1
    return labels


def _plural(shape: str) -> str:
    return shape + "s"


def _q_exist(objs, rng):
    want_yes = rng.random() < 0.5
    kind = rng.choice(["both", "both", "color", "shape"])
    if kind == "both":
        present = {(o.color, o.shape) for o in objs}
        pool = [(c, s) for c in COLORS for s in SHAPES if ((c, s) in present) == want_yes]
        c, s = pool[rng.integers(len(pool))]
        text = rng.choice([f"is there a {c} {s}?", f"are there any {c} {_plural(s)}?",
                           f"does the image contain a {c} {s}?"])
    elif kind == "color":
        pool = [c for c in COLORS if any(o.color == c for o in objs) == want_yes]
        if not pool:
            return None
        c = pool[rng.integers(len(pool))]
        text = rng.choice([f"is there a {c} object?", f"is there anything {c}?"])
    else:
        pool = [s for s in SHAPES if any(o.shape == s for o in objs) == want_yes]
        if not pool:
            return None
        s = pool[rng.integers(len(pool))]
        text = rng.choice([f"is there a {s}?", f"are there any {_plural(s)}?"])
    return text, "yes" if want_yes else "no", {}


def _unique(objs, attr):
    """Attribute values held by exactly one object."""
    counts = Counter(getattr(o, attr) for o in objs)
    return [v for v, k in counts.items() if k == 1]


# query_color and query_shape: the asked attribute of an object named by its other one, which no
# other object shares; three phrasings each.
_QUERY_PHRASINGS = {
    "color": ["what color is the {}?", "what is the color of the {}?", "the {} is what color?"],
    "shape": ["what shape is the {} object?", "what is the shape of the {} thing?",
              "which shape is {}?"],
}


def _q_query(objs, rng, asked: str):
    named_by = "shape" if asked == "color" else "color"
    values = _unique(objs, named_by)
    if not values:
        return None
    v = values[rng.integers(len(values))]
    o = next(o for o in objs if getattr(o, named_by) == v)
    text = rng.choice([p.format(v) for p in _QUERY_PHRASINGS[asked]])
    return text, getattr(o, asked), {}


def _q_query_color(objs, rng):
    return _q_query(objs, rng, "color")


def _q_query_shape(objs, rng):
    return _q_query(objs, rng, "shape")


def _count_questions(objs):
    """Every count question about this scene: (phrasings, answer)."""
    out = []
    for c in COLORS:
        k = sum(o.color == c for o in objs)
        out.append(([f"how many {c} objects are there?", f"how many things are {c}?",
                     f"what is the number of {c} objects?"], k))
    for s in SHAPES:
        k = sum(o.shape == s for o in objs)
        out.append(([f"how many {_plural(s)} are there?", f"how many {_plural(s)} can you see?",
                     f"what is the number of {_plural(s)}?"], k))
    return out


def _q_count(objs, rng):
    # draw the answer first (uniform over the counts this scene offers) so that "0" does not
    # dominate
    questions = _count_questions(objs)
    values = sorted({k for _, k in questions})
    k = values[rng.integers(len(values))]
    pool = [p for p, v in questions if v == k]
    phrasings = pool[rng.integers(len(pool))]
    return str(rng.choice(phrasings)), str(k), {"first_count": k}


def _q_compare(objs, rng):
    want_yes = rng.random() < 0.5
    if rng.random() < 0.5:
        groups = {c + " objects": sum(o.color == c for o in objs) for c in COLORS}
    else:
        groups = {_plural(s): sum(o.shape == s for o in objs) for s in SHAPES}
    fewer = rng.random() < 0.5
    # ties are never asked: the question would hinge on a convention instead of on the image
    # "are there fewer (more) a than b?" is true
    holds = lambda a, b: groups[a] < groups[b] if fewer else groups[a] > groups[b]
    pool = [(a, b) for a in groups for b in groups
            if a != b and groups[a] != groups[b] and holds(a, b) == want_yes]
    if not pool:
        return None
    a, b = pool[rng.integers(len(pool))]
    word = "fewer" if fewer else "more"
    text = rng.choice(
        [f"are there {word} {a} than {b}?", f"does the image have {word} {a} than {b}?"])
    return text, "yes" if want_yes else "no", {"first_count": groups[a], "second_count": groups[b]}


def reference_names(objs):
    """Objects that a short phrase names uniquely: [(phrase, object)]."""
    refs = []
    colors, shapes = _unique(objs, "color"), _unique(objs, "shape")
    pairs = Counter((o.color, o.shape) for o in objs)
    for o in objs:
        if o.color in colors:
            refs.append((f"{o.color} object", o))
        if o.shape in shapes:
            refs.append((o.shape, o))
        if pairs[(o.color, o.shape)] == 1:
            refs.append((f"{o.color} {o.shape}", o))
    return refs


def _q_relate(objs, rng):
    refs = reference_names(objs)
    if not refs:
        return None
    name, ref = refs[rng.integers(len(refs))]
    others = sorted(
        (math.hypot(o.x - ref.x, o.y - ref.y), i) for i, o in enumerate(objs) if o is not ref)
    farthest = rng.random() < 0.5
    d = [dist for dist, _ in others]
    # the answer must not hinge on a near-tie between two distances
    if (farthest and d[-1] - d[-2] < 4) or (not farthest and d[1] - d[0] < 4):
        return None
    target = objs[others[-1][1] if farthest else others[0][1]]
    where = "farthest from" if farthest else "closest to"
    facts = {"reference": ref, "target": target}           # positions: scene_facts makes them cells
    if rng.random() < 0.5:
        text = rng.choice([
            f"what color is the object {where} the {name}?",
            f"the thing {where} the {name} has what color?",
        ])
        return text, target.color, facts
    text = rng.choice([
        f"what shape is the object {where} the {name}?",
        f"the thing {where} the {name} has what shape?",
    ])
    return text, target.shape, facts


GENERATORS = {"exist": _q_exist, "query_color": _q_query_color, "query_shape": _q_query_shape,
               "count": _q_count, "compare": _q_compare, "relate": _q_relate}


# NOTE (deviation): the scene facts. Each generator also returns the intermediate facts its answer
# is computed from, which stage 1 may teach the language model (stand_ins.SceneHeads), as a stand-in
# for what a pretrained BLIP-2 brings: `count`, the count; `compare`, the counts of the first- and
# the second-named group; `relate`, where the reference object and the target are (a cell of a
# FACT_GRID x FACT_GRID grid over the image). Other families carry none, and VQA v2 data has none.
# name -> classes (0: a cell of the grid, FACT_GRID ** 2 of them)
FACTS = {"reference": 0, "target": 0, "first_count": 7, "second_count": 7}
FACT_GRID = 8


def fact_classes(name: str) -> int:
    """How many values scene fact `name` takes: FACT_GRID^2 cells, or the counts 0..6."""
    return FACTS[name] or FACT_GRID ** 2


def fact_cell(o: Obj, image_size: int) -> int:
    """The FACT_GRID x FACT_GRID cell of an object's centre, row-major."""
    return int(o.y * FACT_GRID / image_size) * FACT_GRID + int(o.x * FACT_GRID / image_size)


def scene_facts(facts: dict, image_size: int) -> dict[str, int]:
    """A generator's facts as class indices: an object becomes the cell of its centre."""
    return {
        name: fact_cell(v, image_size) if isinstance(v, Obj) else int(v)
        for name, v in facts.items()
    }


def make_image_with_questions(rng, families: list[str], image_size: int = 64):
    """One scene and one question per requested family; the scene is redrawn until all are askable.
    Returns (image uint8 (H, W, 3), objects, [(family, question, answer, scene facts)])."""
    while True:
        objs = make_scene(rng, image_size)
        qas = [(f, GENERATORS[f](objs, rng)) for f in families]
        texts = [qa[0] for _, qa in qas if qa is not None]
        if all(qa is not None for _, qa in qas) and len(set(texts)) == len(texts):
            return (
                render_scene(objs, rng, image_size),
                objs,
                [(f, q, a, scene_facts(facts, image_size)) for f, (q, a, facts) in qas],
            )


def family_plan(n_images: int, questions_per_image: int, seed: int,
                weights: dict | None = None) -> list[list[str]]:
    """The family of every question slot: rotating over FAMILIES, so that each is ~1/6 of the
    questions; or, with weights (family -> weight), each drawn in proportion to them (a family
    may then be asked twice about one image)."""
    if weights is None:
        return [[FAMILIES[(i * questions_per_image + j) % len(FAMILIES)]
                 for j in range(questions_per_image)] for i in range(n_images)]
    p = np.array([weights[f] for f in FAMILIES], dtype=np.float64)
    drawn = np.random.default_rng([seed, 1]).choice(len(FAMILIES), p=p / p.sum(),
                                                    size=(n_images, questions_per_image))
    return [[FAMILIES[k] for k in row] for row in drawn]


def shapes_image(rng, families: list[str], image_size: int, image_id: int, index: int):
    """One image of the shapes set and its questions as a split stores them: image uint8 (H, W, 3),
    pixel labels uint8 (2, H, W) and one question record per family in `families` (`index`: the
    image's place in its split)."""
    image, objs, qas = make_image_with_questions(rng, families, image_size)
    records = [{"question_id": image_id * 100 + j, "image_id": image_id, "image_index": index,
                "question": q, "answers": [a], "family": fam, "answer_type": ANSWER_TYPES[fam],
                "question_type": fam, "facts": facts}
               for j, (fam, q, a, facts) in enumerate(qas)]
    return image, scene_labels(objs, image_size), records


def draw_images(n_images: int, image_size: int, draw) -> tuple:
    """n_images of shapes_image's outputs, draw(i) each, as one split: images uint8 (n, H, W, 3),
    question records, pixel labels uint8 (n, 2, H, W) (the arrays allocated once: no list of
    images is held beside them)."""
    images = np.empty((n_images, image_size, image_size, 3), dtype=np.uint8)
    labels = np.empty((n_images, 2, image_size, image_size), dtype=np.uint8)
    records = []
    for i in range(n_images):
        images[i], labels[i], asked = draw(i)
        records += asked
    return images, records, labels


def generate_shapes_split(n_images: int, questions_per_image: int, seed: int, image_size: int = 64,
                          first_image_id: int = 0, family_weights: dict | None = None):
    """A split of the shapes set, its images drawn one after the other from one generator, its
    question families as family_plan makes them. Returns images uint8 (n, H, W, 3), a list of
    question records and pixel labels uint8 (n, 2, H, W)."""
    rng = np.random.default_rng(seed)
    plan = family_plan(n_images, questions_per_image, seed, family_weights)
    return draw_images(n_images, image_size,
                       lambda i: shapes_image(rng, plan[i], image_size, first_image_id + i, i))


CALIB_SEED = 999            # + data_seed * 1000; stage 1's epochs use + 3 .. + 2 + epochs


def shapes_splits(cfg: "DataConfig", only: tuple[str, ...] = ("train", "val", "test")):
    """train/val/test/calib of the shapes set: different seeds and disjoint image-id ranges.
    `only` generates just those splits (each is the same whichever others are made)."""
    sizes = {"train": cfg.train_images, "val": cfg.val_images, "test": cfg.test_images,
             "calib": cfg.calib_images}
    seeds = {"train": 0, "val": 1, "test": 2, "calib": CALIB_SEED}
    splits, first_id = {}, 1
    for name, n in sizes.items():
        if n < 1:
            raise DataError(f"--{name}-images must be at least 1 (got {n})")
        if name in only:
            splits[name] = generate_shapes_split(n, cfg.questions_per_image,
                                                 cfg.data_seed * 1000 + seeds[name],
                                                 cfg.image_size, first_id)
        first_id += n
    return splits


def fresh_scenes(cfg: "DataConfig", epoch: int, family_weights: dict | None = None,
                 part: tuple[int, int] = (0, 1)):
    """The raw shapes train split of epoch `epoch` >= 1 (generate_shapes_split's output): as many
    new scenes as --train-images. The generator is unlimited, so no epoch repeats another's images,
    and the model cannot learn the training scenes by heart.

    Image i is drawn from its own seed, [data_seed * 1000 + 2 + epoch, i] (epoch 0 is the train
    split, seed + 0; val and test use + 1 and + 2), so an epoch can be drawn in parts, by several
    processes, and is the same however it is cut: `part` = (k, parts) draws the k-th of `parts`
    equal runs of images."""
    seed = cfg.data_seed * 1000 + 2 + epoch
    plan = family_plan(cfg.train_images, cfg.questions_per_image, seed, family_weights)
    k, parts = part
    first, end = k * cfg.train_images // parts, (k + 1) * cfg.train_images // parts
    image = lambda j: shapes_image(np.random.default_rng([seed, first + j]), plan[first + j],
                                   cfg.image_size, 1 + first + j, j)
    return draw_images(end - first, cfg.image_size, image)


def draw_scene(path: str, seed: int) -> None:
    """data.py --scene: one scene into `path` (and enlarged beside it), and a question of each
    family about it with its answer."""
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        raise DataError(f"--scene {path}: folder {folder} not found")
    image, _, qas = make_image_with_questions(np.random.default_rng(seed), FAMILIES)
    Image.fromarray(image).save(path)
    large = os.path.splitext(path)[0] + "_x4.png"             # the same pixels, big enough to see
    height, width = image.shape[:2]
    Image.fromarray(image).resize((4 * width, 4 * height), Image.NEAREST).save(large)
    print(f"wrote {path} (the model's input) and {large} (enlarged to look at); questions about it "
          f"(family: question -> answer):")
    print("\n".join(f"  {fam}: {q} -> {a}" for fam, q, a, _ in qas))
