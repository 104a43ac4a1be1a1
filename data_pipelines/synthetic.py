"""The built-in captioned-shapes data: deterministic image-text pairs with real false negatives.

Each image shows one or two coloured shapes at named positions. The caption states the
colour, the shape and the position of each object, drawn from several paraphrase templates;
everything it does not state (size, jitter, background, noise) varies freely. The **concept**
of a sample is the tuple of attributes its caption states, and it is stored as the sample's
label: two samples of the same concept are a ground-truth false negative for each other.

``num_concepts`` picks how many distinct concepts the data uses, which sets the expected
false-negative rate in a batch of ``B`` (about ``B / num_concepts`` same-concept negatives per
anchor). Every sample is drawn from its own RNG seeded by ``(seed, split, index)``, so the
output does not depend on how the work is split, and the same seed gives the same bytes.
"""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from .errors import DataError
from .records import RawSample

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 200),
    "orange": (245, 140, 30),
    "white": (245, 245, 245),
    "cyan": (40, 210, 220),
}
SHAPES = ("circle", "square", "triangle", "cross")
POSITIONS = {  # name -> centre as a fraction of the image side
    "top left": (0.27, 0.27),
    "top right": (0.73, 0.27),
    "bottom left": (0.27, 0.73),
    "bottom right": (0.73, 0.73),
    "center": (0.5, 0.5),
}
POSITION_NAMES = tuple(POSITIONS)
TEMPLATES_ONE = (
    "a {c} {s} in the {p}",
    "{p}: a {s}, {c}",
    "a picture of a {c} {s} at the {p}",
    "there is a {c} {s} in the {p} of the image",
    "{c} {s}, {p}",
)
SPLITS = {"train": 0, "val": 1, "test": 2}

Obj = tuple[str, str, str]  # (colour, shape, position)


def _num_single() -> int:
    return len(COLOURS) * len(SHAPES) * len(POSITIONS)


def concept_space_size() -> int:
    """Concepts of one object, plus ordered pairs of objects at two different positions."""
    per_obj = len(COLOURS) * len(SHAPES)
    pairs = len(POSITIONS) * (len(POSITIONS) - 1)
    return _num_single() + per_obj * per_obj * pairs


def decode_concept(cid: int) -> tuple[Obj, ...]:
    """Map an index of the concept space to its objects (mixed-radix, no table)."""
    colours, nc, ns, npos = list(COLOURS), len(COLOURS), len(SHAPES), len(POSITIONS)
    if not 0 <= cid < concept_space_size():
        raise ValueError(f"concept id {cid} outside [0, {concept_space_size()})")
    if cid < _num_single():
        c, rest = cid % nc, cid // nc
        s, p = rest % ns, rest // ns
        return ((colours[c], SHAPES[s], POSITION_NAMES[p]),)
    cid -= _num_single()
    c1, cid = cid % nc, cid // nc
    s1, cid = cid % ns, cid // ns
    c2, cid = cid % nc, cid // nc
    s2, pair = cid % ns, cid // ns
    p1, k = divmod(pair, npos - 1)
    p2 = k if k < p1 else k + 1
    return (
        (colours[c1], SHAPES[s1], POSITION_NAMES[p1]),
        (colours[c2], SHAPES[s2], POSITION_NAMES[p2]),
    )


def concept_name(objs: tuple[Obj, ...]) -> str:
    return " and ".join(f"{c} {s} {p}".rstrip() for c, s, p in objs)


SIZES = {"small": (0.09, 0.13), "large": (0.17, 0.22)}  # radius as a share of the side
TEMPLATES_DETAILS = (
    "a {z} {c} {s} in the {p}",
    "{p}: a {z} {s}, {c}",
    "a picture of a {z} {c} {s} at the {p}",
    "there is a {z} {c} {s} in the {p} of the image",
    "{z} {c} {s}, {p}",
)


TEMPLATES_PARAPHRASE = (  # the concept only, in other words
    "a {c} {s}",
    "a picture of a {c} {s}",
    "there is a {c} {s} in the image",
    "{c} {s}",
    "an image showing a {s} that is {c}",
    "a {s}, {c}",
    "a photo of a {c} {s}",
    "one {c} {s}",
)


def _with_paraphrase(objs: tuple[Obj, ...], rng: np.random.Generator) -> tuple[tuple, str]:
    """Draw the per-image position and size of a one-object concept as ``_with_details`` does;
    the caption states only the concept, in one of several wordings."""
    ((c, s, _),) = objs
    p = POSITION_NAMES[rng.integers(len(POSITION_NAMES))]
    z = tuple(SIZES)[rng.integers(len(SIZES))]
    t = TEMPLATES_PARAPHRASE[rng.integers(len(TEMPLATES_PARAPHRASE))]
    return ((c, s, p, SIZES[z]),), t.format(c=c, s=s)


def _with_details(objs: tuple[Obj, ...], rng: np.random.Generator) -> tuple[tuple, str]:
    """Draw the per-image position and size of a one-object concept; the caption states them."""
    ((c, s, _),) = objs
    p = POSITION_NAMES[rng.integers(len(POSITION_NAMES))]
    z = tuple(SIZES)[rng.integers(len(SIZES))]
    t = TEMPLATES_DETAILS[rng.integers(len(TEMPLATES_DETAILS))]
    return ((c, s, p, SIZES[z]),), t.format(z=z, c=c, s=s, p=p)


@dataclass(frozen=True)
class SyntheticSpec:
    """Parameters of the generator; they go into the manifest."""

    num_concepts: int = 64
    seed: int = 0
    image_size: int = 64
    single_object_share: float = 0.5  # share of concepts with one object
    noise_std: float = 6.0
    jpeg_quality: int = 90
    # Captions that also state per-image details which are not part of the concept (the
    # ``fn-testbed`` preset): the concept is one object's colour and shape, and each image
    # draws its own position and size, which the caption states and the image shows.
    details: bool = False
    # Captions that state only the concept, in one of several wordings, while each image draws
    # its own position and size as with ``details`` (the ``fn-paraphrase`` preset): two samples
    # of a concept are false negatives whose captions differ in wording only.
    paraphrase: bool = False
    # Concept frequencies: 0 draws every concept equally often; s > 0 draws concept ``k`` with
    # probability proportional to ``1 / (k + 1) ** s`` (the ``fn-longtail`` preset, s = 1: of 16
    # concepts the most common is 30 % of the data and the rarest 1.8 %, as web data's fall).
    long_tail: float = 0.0

    def __post_init__(self) -> None:
        if not 1 <= self.num_concepts <= concept_space_size():
            raise DataError(
                f"--num-concepts must be in [1, {concept_space_size()}], got {self.num_concepts}"
            )
        if self.image_size < 16:
            raise DataError(f"--image-size must be >= 16, got {self.image_size}")
        if self.details and self.paraphrase:
            raise DataError("a spec has per-image details stated or paraphrases, not both")
        if (self.details or self.paraphrase) and self.num_concepts > len(COLOURS) * len(SHAPES):
            raise DataError(
                "with per-image details the concepts are colour-shape pairs: --num-concepts "
                f"must be <= {len(COLOURS) * len(SHAPES)}, got {self.num_concepts}"
            )
        if not (math.isfinite(self.long_tail) and self.long_tail >= 0):
            raise DataError(f"--long-tail must be a number >= 0, got {self.long_tail}")

    def concept_shares(self) -> np.ndarray:
        """``[num_concepts]``: the probability of each label (uniform without ``long_tail``)."""
        w = 1.0 / np.arange(1, self.num_concepts + 1, dtype=np.float64) ** self.long_tail
        return w / w.sum()

    def concepts(self) -> list[tuple[Obj, ...]]:
        """The concepts in use, chosen by the seed: label ``k`` is ``concepts()[k]``.

        With ``details`` each concept is one ``(colour, shape, "")`` object: its position is
        drawn per image."""
        rng = np.random.default_rng([self.seed, 7919])
        if self.details or self.paraphrase:
            pairs = [(c, s, "") for c in COLOURS for s in SHAPES]
            return [(pairs[int(i)],) for i in rng.choice(len(pairs), self.num_concepts, False)]
        n_single = min(_num_single(), round(self.num_concepts * self.single_object_share))
        singles = rng.choice(_num_single(), n_single, replace=False)
        n_pair_space = concept_space_size() - _num_single()
        pairs = _num_single() + rng.choice(
            n_pair_space, self.num_concepts - n_single, replace=False
        )
        ids = [int(i) for i in np.concatenate([singles, pairs])]
        return [decode_concept(i) for i in ids]


# Named settings of the generator. A preset sets the spec's fields; flags given beside it win.
PRESETS: dict[str, dict] = {
    # Data where removing false negatives pays (benchmarks/fn_benefit.py): 16 colour-shape
    # concepts, and captions that also state each image's own position and size. Two samples
    # of a concept are false negatives although their captions differ, so a loss that treats
    # them as negatives learns to tell them apart by position and size instead of grouping
    # them; about 16 of them share each anchor's concept in a batch of 256.
    "fn-testbed": {"details": True, "num_concepts": 16, "image_size": 32},
    # The same images, captions that state only the concept ("a red circle", "a photo of a
    # red circle", ...): false negatives that are paraphrases, the image's position and size
    # left unsaid.
    "fn-paraphrase": {"paraphrase": True, "num_concepts": 16, "image_size": 32},
    # The fn-testbed's images and captions with concepts as unequally common as web data's:
    # concept k is drawn with probability 1 / (k + 1) over 16 concepts, from 30 % of the data
    # down to 1.8 %, so an anchor's share of same-concept negatives differs 16-fold from the
    # most common concept to the rarest. Where one threshold for every anchor flags the common
    # concepts' negatives and none of the rare ones', each anchor's own threshold is the point.
    "fn-longtail": {"details": True, "num_concepts": 16, "image_size": 32, "long_tail": 1.0},
}


def preset_spec(name: str | None, **fields) -> SyntheticSpec:
    """A :class:`SyntheticSpec` from a preset's fields, then ``fields`` (those not ``None``)."""
    if name is not None and name not in PRESETS:
        raise DataError(f"unknown preset {name!r}; presets: {', '.join(PRESETS)}")
    merged = {
        **(PRESETS[name] if name else {}),
        **{k: v for k, v in fields.items() if v is not None},
    }
    return SyntheticSpec(**merged)


def caption_for(objs: tuple[Obj, ...], rng: np.random.Generator) -> str:
    parts = []
    for c, s, p in objs:
        t = TEMPLATES_ONE[rng.integers(len(TEMPLATES_ONE))]
        parts.append(t.format(c=c, s=s, p=p))
    return " and ".join(parts)


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, colour) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=colour)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=colour)
    elif shape == "cross":
        w = r / 2.5
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=colour)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=colour)
    else:  # pragma: no cover - SHAPES is closed
        raise ValueError(shape)


def render(objs: tuple[tuple, ...], spec: SyntheticSpec, rng: np.random.Generator) -> Image.Image:
    size = spec.image_size
    bg = tuple(int(v) for v in rng.integers(20, 110, size=3))
    im = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(im)
    for colour, shape, pos, *radius in objs:
        fx, fy = POSITIONS[pos]
        jitter = size * 0.05
        cx = fx * size + rng.uniform(-jitter, jitter)
        cy = fy * size + rng.uniform(-jitter, jitter)
        r = size * rng.uniform(*(radius[0] if radius else (0.10, 0.17)))
        shade = np.clip(np.array(COLOURS[colour]) + rng.integers(-20, 21, size=3), 0, 255)
        _draw(draw, shape, cx, cy, r, tuple(int(v) for v in shade))
    arr = np.asarray(im, dtype=np.float32)
    arr = arr + rng.normal(0.0, spec.noise_std, size=arr.shape)
    return Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8))


def generate(spec: SyntheticSpec, num_samples: int, split: str = "train") -> Iterator[RawSample]:
    """Yield ``num_samples`` captioned images of ``split`` (train/val/test), deterministically."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {list(SPLITS)}, got {split!r}")
    concepts = spec.concepts()
    shares = spec.concept_shares() if spec.long_tail else None
    for i in range(num_samples):
        rng = np.random.default_rng([spec.seed, SPLITS[split], i])
        if shares is None:
            label = int(rng.integers(len(concepts)))
        else:
            label = int(rng.choice(len(concepts), p=shares))
        objs = concepts[label]
        if spec.details or spec.paraphrase:
            drawn, caption = (_with_details if spec.details else _with_paraphrase)(objs, rng)
            image = render(drawn, spec, rng)
        else:
            image = render(objs, spec, rng)
            caption = caption_for(objs, rng)  # after the image: the draws keep their order
        buf = io.BytesIO()
        image.save(buf, format="JPEG", quality=spec.jpeg_quality)
        yield RawSample(
            image=buf.getvalue(),
            image_ext="jpg",
            caption=caption,
            label=label,
            source=f"synthetic:{split}:{i}",
        )


def label_names(spec: SyntheticSpec) -> list[str]:
    return [concept_name(c) for c in spec.concepts()]
