"""Shapes world: a deterministic procedural dataset of coloured shapes with questions and answers.

Each integer seed selects one example: an RGB image (``IMAGE_SIZE``² px) with one to three shapes of distinct
colours and distinct kinds, one per cell of a 3 x 3 grid (small jitter inside the cell, so that a 16 px patch grid
sees each object in exactly one patch), on a plain or grey-noise background, plus one question of one task:

=========  ======================================  ==============================================
task       question                                answer
=========  ======================================  ==============================================
color      ``what color is the star ?``            ``red``
shape      ``what shape is the red one ?``         ``star``
count      ``how many shapes are there ?``         ``one`` / ``two`` / ``three``
position   ``where is the star ?``                 ``top-left`` ... ``bottom-right`` (one token)
caption    ``describe the image .``                ``a red star and a blue circle`` (reading order)
=========  ======================================  ==============================================

Training seeds are ``< HELD_OUT_START``; held-out seeds are ``>= HELD_OUT_START``: the two never overlap.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

from vlm_lens.errors import InputError

IMAGE_SIZE = 48
GRID = 3
HELD_OUT_START = 10_000_000

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 60, 220),
    "yellow": (235, 215, 20),
    "purple": (140, 40, 180),
    "orange": (250, 130, 10),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond")
POSITIONS = (
    "top-left", "top", "top-right",
    "left", "center", "right",
    "bottom-left", "bottom", "bottom-right",
)  # fmt: skip
COUNTS = ("one", "two", "three")
TASKS = ("color", "shape", "count", "position", "caption")
QUESTION_WORDS = "what color is the shape one how many shapes are there where describe image . ? a and".split()
CAPTION_PROMPT = "describe the image ."


def vocabulary() -> list[str]:
    """Every word a question or answer of the shapes world can contain."""
    return sorted(set(QUESTION_WORDS) | set(COLORS) | set(SHAPES) | set(POSITIONS) | set(COUNTS))


@dataclass(frozen=True)
class ShapeObject:
    color: str
    kind: str
    cell: int  # row-major index in the 3 x 3 grid

    @property
    def position(self) -> str:
        return POSITIONS[self.cell]


@dataclass(frozen=True)
class Example:
    seed: int
    image: Image.Image
    objects: tuple[ShapeObject, ...]
    task: str
    question: str
    answer: str


def _draw_shape(draw: ImageDraw.ImageDraw, kind: str, cx: float, cy: float, r: float, fill) -> None:
    if kind == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif kind == "square":
        s = r * 0.85
        draw.rectangle([cx - s, cy - s, cx + s, cy + s], fill=fill)
    elif kind == "triangle":
        draw.polygon([(cx, cy - r), (cx + r, cy + r * 0.8), (cx - r, cy + r * 0.8)], fill=fill)
    elif kind == "diamond":
        draw.polygon([(cx, cy - r), (cx + r * 0.75, cy), (cx, cy + r), (cx - r * 0.75, cy)], fill=fill)
    elif kind == "star":
        angles = np.arange(10) * np.pi / 5 - np.pi / 2
        radii = np.where(np.arange(10) % 2 == 0, r, r * 0.42)
        draw.polygon([(cx + q * np.cos(a), cy + q * np.sin(a)) for a, q in zip(angles, radii)], fill=fill)
    else:  # pragma: no cover - guarded by SHAPES
        raise InputError(kind)


def render(objects: tuple[ShapeObject, ...], rng: np.random.Generator, noisy: bool, size: int = IMAGE_SIZE):
    """Draw ``objects`` at 4x resolution and downsample (anti-aliased edges)."""
    scale = 4
    big = size * scale
    cell = big / GRID
    background = np.full((big, big, 3), 245, dtype=np.uint8)
    image = Image.fromarray(background)
    draw = ImageDraw.Draw(image)
    for obj in objects:
        row, col = divmod(obj.cell, GRID)
        jitter = rng.uniform(-1.0, 1.0, size=2) * scale
        cx = (col + 0.5) * cell + jitter[0]
        cy = (row + 0.5) * cell + jitter[1]
        r = cell * rng.uniform(0.33, 0.40)
        _draw_shape(draw, obj.kind, cx, cy, r, COLORS[obj.color])
    image = image.resize((size, size), Image.Resampling.LANCZOS)
    if noisy:
        pixels = np.asarray(image).astype(np.int16)
        pixels = pixels + rng.integers(-25, 26, size=(size, size, 1))
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    return image


def caption(objects: tuple[ShapeObject, ...]) -> str:
    """``a red star and a blue circle``: objects in reading order (row-major cell index)."""
    ordered = sorted(objects, key=lambda o: o.cell)
    return " and ".join(f"a {o.color} {o.kind}" for o in ordered)


def example(seed: int, *, task: str | None = None, max_objects: int = 3, subject: str | None = None) -> Example:
    """The example of ``seed``; ``task`` forces a task, ``max_objects`` limits the scene (curriculum).

    ``subject`` forces what the question is about: a shape kind for the color and position tasks ("what color is
    the star ?"), a colour for the shape task ("what shape is the red one ?"). The scene then contains it (the
    first object takes that kind or colour if none has it). Without ``subject`` the random stream is unchanged.
    """
    if seed < 0:
        raise InputError("seeds are non-negative integers")
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, max_objects + 1))
    colors = rng.choice(list(COLORS), size=n, replace=False)
    kinds = rng.choice(list(SHAPES), size=n, replace=False)
    cells = rng.choice(GRID * GRID, size=n, replace=False)
    color_list, kind_list = [str(c) for c in colors], [str(k) for k in kinds]
    if subject is not None:
        color_list, kind_list = _with_subject(task, subject, color_list, kind_list)
    objects = tuple(ShapeObject(c, k, int(cell)) for c, k, cell in zip(color_list, kind_list, cells))
    noisy = bool(rng.random() < 0.5)
    image = render(objects, rng, noisy)
    chosen_task = task if task is not None else TASKS[int(rng.integers(len(TASKS)))]
    if chosen_task not in TASKS:
        raise InputError(f"unknown task {chosen_task!r}; choose one of {TASKS}")
    target = objects[int(rng.integers(n))]
    if subject is not None:
        target = next(o for o in objects if subject in (o.kind, o.color))
    if chosen_task == "color":
        question, answer = f"what color is the {target.kind} ?", target.color
    elif chosen_task == "shape":
        question, answer = f"what shape is the {target.color} one ?", target.kind
    elif chosen_task == "count":
        question, answer = "how many shapes are there ?", COUNTS[n - 1]
    elif chosen_task == "position":
        question, answer = f"where is the {target.kind} ?", target.position
    else:
        question, answer = CAPTION_PROMPT, caption(objects)
    return Example(seed, image, objects, chosen_task, question, answer)


def _with_subject(task: str | None, subject: str, colors: list, kinds: list) -> tuple[list, list]:
    if task in ("color", "position"):
        if subject not in SHAPES:
            raise InputError(f"a {task} question is about a shape kind {SHAPES}, got subject {subject!r}")
        if subject not in kinds:
            kinds[0] = subject
    elif task == "shape":
        if subject not in COLORS:
            raise InputError(f"a shape question is about a colour {tuple(COLORS)}, got subject {subject!r}")
        if subject not in colors:
            colors[0] = subject
    else:
        raise InputError(f"subject needs task color, shape or position, got task {task!r}")
    return colors, kinds


def held_out(n: int, *, task: str | None = None, start: int = 0) -> list[Example]:
    """``n`` held-out examples (seeds ``HELD_OUT_START + start ...``), all of ``task`` if given."""
    return [example(HELD_OUT_START + start + i, task=task) for i in range(n)]
