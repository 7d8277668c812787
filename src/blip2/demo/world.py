"""The demo's world: scenes of one simple object, a renderer, captions, questions, and a parser.

A scene is one object with a shape, a colour, a size and a horizontal position, drawn on a plain
background of a random light shade with some jitter in place, size and colour. Each scene has one
*canonical* caption ("a large red circle on the left") and several paraphrases, all from a small
grammar, and questions with one-word answers. The parser reads any sentence of the grammar back into
attributes, which is how generated captions are scored.

Some scenes are held out: no training image shows them, so the test images of those scenes measure
whether the model composes attributes it has only seen in other combinations.

`write_dataset` renders a training set and a held-out test set to disk in the formats the training
engine reads: PNG files with COCO-style JSON lists (`captions` / `retrieval` / `vqa` layouts) and
webdataset tar shards.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import random
import tarfile
from collections.abc import Sequence
from dataclasses import dataclass, field

from PIL import Image, ImageDraw

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 40, 40),
    "green": (40, 165, 65),
    "blue": (45, 85, 220),
    "yellow": (230, 200, 40),
    "purple": (150, 60, 185),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "diamond")
SIZES: dict[str, tuple[float, float]] = {"small": (5.5, 7.5), "large": (11.0, 13.5)}  # radius range, px
POSITIONS: dict[str, float] = {"left": 0.25, "middle": 0.5, "right": 0.75}  # centre x / image width
WHERE = {"left": "on the left", "middle": "in the middle", "right": "on the right"}

# paraphrase templates; the first is the canonical caption
TEMPLATES: tuple[str, ...] = (
    "a {size} {colour} {shape} {where}",
    "there is a {size} {colour} {shape} {where}",
    "{where} there is a {size} {colour} {shape}",
    "a {size} {shape} in {colour} {where}",
    "a {colour} {shape} {where} and it is {size}",
)

# question kind -> (templates, answer attribute); "{shape}"/"{colour}" are filled from the scene
QUESTIONS: dict[str, tuple[tuple[str, ...], str]] = {
    "colour": (("what colour is the {shape}?", "which colour does the {shape} have?"), "colour"),
    "shape": (("what shape is the {colour} object?", "which shape is {colour}?"), "shape"),
    "size": (("what size is the {shape}?", "is the {shape} small or large?"), "size"),
    "position": (("where is the {shape}?", "where is the {colour} object?"), "position"),
    "yesno": (("is the {shape} {other_colour}?", "is there a {other_colour} {shape}?"), "yesno"),
}
ANSWERS: dict[str, tuple[str, ...]] = {
    "colour": tuple(COLOURS),
    "shape": SHAPES,
    "size": tuple(SIZES),
    "position": tuple(POSITIONS),
    "yesno": ("yes", "no"),
}


@dataclass(frozen=True)
class Scene:
    """One object: its four attributes (the scene's labels)."""

    shape: str
    colour: str
    size: str
    position: str

    @property
    def pair(self) -> tuple[str, str]:
        return (self.colour, self.shape)

    def labels(self) -> dict[str, int]:
        """The attributes as class indices (the image encoder's pre-training targets)."""
        return {
            "shape": SHAPES.index(self.shape),
            "colour": list(COLOURS).index(self.colour),
            "size": list(SIZES).index(self.size),
            "position": list(POSITIONS).index(self.position),
        }


LABEL_CLASSES: dict[str, int] = {
    "shape": len(SHAPES),
    "colour": len(COLOURS),
    "size": len(SIZES),
    "position": len(POSITIONS),
}


@dataclass(frozen=True)
class World:
    """All scenes and which of them never appear in training images.

    Held out are whole scenes (one combination of the four attributes), about one in ten, chosen so
    that every pair of attribute values (e.g. red + triangle, triangle + left) still occurs in some
    training scene: a held-out test image shows a combination the model has never seen, made of parts
    it has.
    """

    heldout_every: int = 10
    scenes: tuple[Scene, ...] = field(init=False)

    def __post_init__(self) -> None:
        scenes = tuple(
            Scene(shape, colour, size, pos)
            for shape, colour, size, pos in itertools.product(SHAPES, COLOURS, SIZES, POSITIONS)
        )
        object.__setattr__(self, "scenes", scenes)

    def is_heldout(self, scene: Scene) -> bool:
        i = scene.labels()
        return (i["shape"] * 7 + i["colour"] * 3 + i["size"] * 5 + i["position"]) % self.heldout_every == 0

    @property
    def train_scenes(self) -> list[Scene]:
        return [s for s in self.scenes if not self.is_heldout(s)]

    @property
    def heldout_scenes(self) -> list[Scene]:
        return [s for s in self.scenes if self.is_heldout(s)]

    @property
    def distinct_captions(self) -> int:
        return len({canonical_caption(s) for s in self.scenes})

    def describe(self) -> dict[str, object]:
        return {
            "objects_per_scene": 1,
            "shapes": list(SHAPES),
            "colours": list(COLOURS),
            "sizes": list(SIZES),
            "positions": list(POSITIONS),
            "distinct_captions": self.distinct_captions,
            "paraphrases_per_scene": len(TEMPLATES),
            "heldout_scenes": [canonical_caption(s) for s in self.heldout_scenes],
        }


# ------------------------------------------------------------------------------------------- text


def captions(scene: Scene) -> list[str]:
    """All paraphrases of a scene; the first is the canonical caption."""
    slots = {
        "size": scene.size,
        "colour": scene.colour,
        "shape": scene.shape,
        "where": WHERE[scene.position],
    }
    return [t.format(**slots) for t in TEMPLATES]


def canonical_caption(scene: Scene) -> str:
    return captions(scene)[0]


def question(scene: Scene, kind: str, rng: random.Random) -> tuple[str, str]:
    """A question of `kind` about the scene and its one-word answer."""
    templates, _ = QUESTIONS[kind]
    template = rng.choice(templates)
    answer = {"colour": scene.colour, "shape": scene.shape, "size": scene.size, "position": scene.position}
    other = scene.colour
    if kind == "yesno":
        if rng.random() < 0.5:
            other = rng.choice([c for c in COLOURS if c != scene.colour])
        text = template.format(shape=scene.shape, other_colour=other)
        return text, "yes" if other == scene.colour else "no"
    return template.format(shape=scene.shape, colour=scene.colour), answer[kind]


def vqa_text(template: str, q: str, a: str | None = None) -> str:
    """A question in the LM's VQA template, followed by its answer when given."""
    text = template.format(q)
    return text if a is None else f"{text} {a}"


@dataclass
class Parsed:
    """What a sentence of the grammar says: the attributes of each object it mentions."""

    objects: list[dict[str, str]]

    @property
    def count(self) -> int:
        return len(self.objects)


def parse_caption(text: str) -> Parsed:
    """Read a caption back into objects: each shape word closes an object with the colour and size
    words around it (before it, or after it up to the next shape)."""
    words = text.lower().replace(",", " ").split()
    objects: list[dict[str, str]] = []
    pending: dict[str, str] = {}
    for w in words:
        if w in COLOURS:
            key = "colour"
        elif w in SIZES:
            key = "size"
        elif w in POSITIONS:
            key = "position"
        elif w in SHAPES:
            pending["shape"] = w
            objects.append(pending)
            pending = {}
            continue
        else:
            continue
        if objects and key not in objects[-1] and (key in pending or not pending):
            objects[-1][key] = w  # an attribute after its shape ("a circle in red")
        else:
            pending[key] = w
    if pending and objects:
        for k, v in pending.items():
            objects[-1].setdefault(k, v)
    return Parsed(objects)


def caption_facts(prediction: str, scene: Scene) -> tuple[int, int]:
    """(facts stated correctly, facts) of a generated caption: the object's colour and shape, and the
    object count."""
    parsed = parse_caption(prediction)
    right = int(parsed.count == 1)
    if parsed.objects:
        obj = parsed.objects[0]
        right += int(obj.get("colour") == scene.colour) + int(obj.get("shape") == scene.shape)
    return right, 3


def caption_exact(prediction: str, scene: Scene) -> bool:
    """Whether a caption states every attribute right (one object; shape, colour, size, position)."""
    parsed = parse_caption(prediction)
    want = {"shape": scene.shape, "colour": scene.colour, "size": scene.size, "position": scene.position}
    return parsed.count == 1 and parsed.objects[0] == want


# ------------------------------------------------------------------------------------------- pixels


def render(scene: Scene, rng: random.Random, size: int = 64) -> Image.Image:
    """Draw a scene: a jittered object of the scene's attributes on a light background."""
    shade = rng.randint(200, 250)
    bg = tuple(min(255, max(0, shade + rng.randint(-8, 8))) for _ in range(3))
    image = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(image)
    lo, hi = SIZES[scene.size]
    r = rng.uniform(lo, hi) * size / 64
    cx = POSITIONS[scene.position] * size + rng.uniform(-3, 3) * size / 64
    cy = rng.uniform(0.3, 0.7) * size
    colour = tuple(min(255, max(0, c + rng.randint(-20, 20))) for c in COLOURS[scene.colour])
    if scene.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=colour)
    elif scene.shape == "square":
        s = r * 0.89  # about the circle's area
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=colour)
    elif scene.shape == "triangle":
        t = r * 1.25
        draw.polygon(
            [(cx, cy - t), (cx - t * 0.95, cy + t * 0.7), (cx + t * 0.95, cy + t * 0.7)], fill=colour
        )
    elif scene.shape == "diamond":
        d = r * 1.2
        draw.polygon([(cx, cy - d), (cx + d, cy), (cx, cy + d), (cx - d, cy)], fill=colour)
    else:
        raise ValueError(f"unknown shape {scene.shape!r}")
    return image


# ------------------------------------------------------------------------------------------- files


@dataclass
class Example:
    """One rendered image and its texts."""

    key: str
    scene: Scene
    captions: list[str]
    questions: list[tuple[str, str, str]]  # (kind, question, answer)
    heldout: bool


def sample_examples(
    world: World, n: int, split: str, rng: random.Random, scenes: Sequence[Scene], questions_per_image: int
) -> list[Example]:
    """`n` examples cycling over `scenes` in a random order (every scene equally often)."""
    order: list[Scene] = []
    while len(order) < n:
        block = list(scenes)
        rng.shuffle(block)
        order.extend(block)
    out = []
    kinds = list(QUESTIONS)
    for i, scene in enumerate(order[:n]):
        qs = []
        for kind in rng.sample(kinds, questions_per_image):
            q, a = question(scene, kind, rng)
            qs.append((kind, q, a))
        out.append(
            Example(
                key=f"{split}/{i:06d}",
                scene=scene,
                captions=captions(scene),
                questions=qs,
                heldout=world.is_heldout(scene),
            )
        )
    return out


@dataclass
class DatasetPaths:
    """Where `write_dataset` put things (all under `root`)."""

    root: str
    train_json: str  # retrieval layout: image, caption list, image_id = canonical caption id
    train_shards: str  # brace pattern of the webdataset shards (one caption per sample)
    test_json: str  # captions layout of the held-out images (canonical caption first)
    test_vqa_json: str  # vqa layout of the held-out images
    meta_json: str  # scenes of every image (for scoring)

    def to_dict(self) -> dict[str, str]:
        return dict(self.__dict__)


def _png(image: Image.Image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def _tar_add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def write_dataset(
    root: str,
    world: World,
    n_train: int,
    n_test: int,
    seed: int,
    heldout_test_fraction: float = 0.4,
    num_shards: int = 4,
    image_size: int = 64,
) -> tuple[DatasetPaths, list[Example], list[Example]]:
    """Render the training and test images and write them with their annotations.

    The test set mixes new renders of training scenes with held-out scenes (`heldout_test_fraction`
    of it). The training JSON (retrieval layout) gives every entry the id of
    its canonical caption as `image_id`, so images showing the same scene are ITC positives and never
    ITM negatives of one another; the shards carry the same images with one paraphrase each.
    """
    rng = random.Random(seed)
    os.makedirs(os.path.join(root, "train"), exist_ok=True)
    os.makedirs(os.path.join(root, "test"), exist_ok=True)
    caption_id = {canonical_caption(s): i for i, s in enumerate(world.scenes)}

    train = sample_examples(world, n_train, "train", rng, world.train_scenes, questions_per_image=2)
    n_heldout = round(n_test * heldout_test_fraction)
    test = sample_examples(world, n_test - n_heldout, "test", rng, world.train_scenes, 2)
    test += sample_examples(world, n_heldout, "test", rng, world.heldout_scenes, 2)
    for i, ex in enumerate(test):
        ex.key = f"test/{i:06d}"

    shard_paths = [os.path.join(root, "shards", f"{i:05d}.tar") for i in range(num_shards)]
    os.makedirs(os.path.join(root, "shards"), exist_ok=True)
    tars = [tarfile.open(p, "w") for p in shard_paths]
    train_entries = []
    for i, ex in enumerate(train):
        png = _png(render(ex.scene, rng, image_size))
        with open(os.path.join(root, ex.key + ".png"), "wb") as f:
            f.write(png)
        train_entries.append(
            {
                "image": ex.key + ".png",
                "caption": ex.captions,
                "image_id": caption_id[ex.captions[0]],
            }
        )
        key = f"{i:06d}"
        _tar_add(tars[i % num_shards], key + ".png", png)
        meta = {"caption": rng.choice(ex.captions), "image_id": caption_id[ex.captions[0]]}
        _tar_add(tars[i % num_shards], key + ".json", json.dumps(meta).encode())
    for t in tars:
        t.close()
    for ex in test:
        render(ex.scene, rng, image_size).save(os.path.join(root, ex.key + ".png"))

    paths = DatasetPaths(
        root=root,
        train_json=os.path.join(root, "train.json"),
        train_shards=os.path.join(root, "shards", "{" + f"00000..{num_shards - 1:05d}" + "}.tar"),
        test_json=os.path.join(root, "test.json"),
        test_vqa_json=os.path.join(root, "test_vqa.json"),
        meta_json=os.path.join(root, "scenes.json"),
    )
    _dump(paths.train_json, train_entries)
    _dump(paths.test_json, [{"image": ex.key + ".png", "caption": ex.captions} for ex in test])
    _dump(
        paths.test_vqa_json,
        [
            {"image": ex.key + ".png", "question": q, "answer": a, "kind": kind}
            for ex in test
            for kind, q, a in ex.questions
        ],
    )
    _dump(
        paths.meta_json,
        {
            ex.key: {**ex.scene.__dict__, "heldout": ex.heldout, "canonical": ex.captions[0]}
            for ex in itertools.chain(train, test)
        },
    )
    return paths, train, test


def _dump(path: str, obj: object) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=0)
