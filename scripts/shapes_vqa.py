"""Questions and answers about the procedural shapes images, for the vision-language demo.

Built only on the public API of ``shapes.py`` (``make_shapes``, ``CLASS_NAMES`` and the ``ShapesData``
fields ``images``, ``labels``, ``masks``, ``centers``), so it works with any version of that generator
that keeps them. Three question types, each with a few phrasings:

- ``shape``: "what shape is it?" -> the target's class name (``CLASS_NAMES[label]``);
- ``colour``: "what colour is the shape?" -> a colour name read from the image: the mean RGB of the
  target's mask pixels, converted to a hue (``colorsys``) and named by the 60-degree hue sector it falls
  in (:data:`COLOUR_NAMES`: red at 0 degrees, yellow 60, green 120, cyan 180, blue 240, magenta 300).
  A target whose hue lies within :data:`HUE_MARGIN` degrees of a sector border, or whose mean colour is
  too grey to have a hue (saturation < 0.25), gets no colour question: its name would be a coin toss;
- ``position``: "where is the shape?" -> "top left", "top right", "bottom left" or "bottom right", from
  the target's centre against the image midlines; a centre within :data:`POSITION_MARGIN` of the image
  side from a midline gets no position question.

Every answer word, question word and the prompt's words are in :func:`vocabulary`, so the demo's
word-level tokenizer never meets an unknown word.

The prompt format is the chat template of the demo model (``train_demo_llava.py``):
``user: <image> {question} assistant:`` and the model answers ``{answer} </s>``.
"""

from __future__ import annotations

import colorsys
from dataclasses import dataclass

import numpy as np

from shapes import CLASS_NAMES, ShapesData

__all__ = ["COLOUR_NAMES", "POSITION_NAMES", "QUESTION_TYPES", "QUESTIONS", "Question", "colour_names",
           "positions", "make_questions", "vocabulary", "SPECIAL_TOKENS", "PROMPT_WORDS"]

COLOUR_NAMES = ("red", "yellow", "green", "cyan", "blue", "magenta")
POSITION_NAMES = ("top left", "top right", "bottom left", "bottom right")
#: degrees of hue around a sector border that are left unnamed
HUE_MARGIN = 8.0
#: fraction of the image side around a midline that is left unnamed
POSITION_MARGIN = 0.06
QUESTION_TYPES = ("shape", "colour", "position")
#: phrasings per question type; the first of each is the one the demo recording asks
QUESTIONS: dict[str, tuple[str, ...]] = {
    "shape": ("what shape is it?", "which shape is in the image?", "what is the shape?"),
    "colour": ("what colour is the shape?", "what color is it?", "which colour is the object?"),
    "position": ("where is the shape?", "where is the object?", "where is it?"),
}
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<image>", "<unk>")
#: the words of the chat template around the question
PROMPT_WORDS = ("user", "assistant", ":")


@dataclass(frozen=True)
class Question:
    """One question about one image.

    Attributes:
        index: the image's index in its ``ShapesData``.
        kind: "shape", "colour" or "position".
        prompt: the question text.
        answer: the reference answer (lowercase words).
    """

    index: int
    kind: str
    prompt: str
    answer: str


def colour_names(data: ShapesData) -> list[str | None]:
    """The colour name of each target (None where it is ambiguous, see the module docstring)."""
    out: list[str | None] = []
    for img, mask in zip(data.images, data.masks):
        pix = img[mask.astype(bool)]
        if len(pix) == 0:
            out.append(None)
            continue
        r, g, b = (pix.astype(np.float64).mean(0) / 255.0).tolist()
        hue, sat, _ = colorsys.rgb_to_hsv(r, g, b)
        deg = hue * 360.0
        sector = int(((deg + 30.0) % 360.0) // 60.0)
        offset = (deg + 30.0) % 60.0  # distance into the sector, 0..60
        if sat < 0.25 or min(offset, 60.0 - offset) < HUE_MARGIN:
            out.append(None)
        else:
            out.append(COLOUR_NAMES[sector])
    return out


def positions(data: ShapesData) -> list[str | None]:
    """The quadrant of each target's centre (None near a midline)."""
    size_y, size_x = data.images.shape[1:3]
    out: list[str | None] = []
    for x, y in data.centers.tolist():
        dx, dy = x - size_x / 2, y - size_y / 2
        if abs(dx) < POSITION_MARGIN * size_x or abs(dy) < POSITION_MARGIN * size_y:
            out.append(None)
        else:
            out.append(f"{'top' if dy < 0 else 'bottom'} {'left' if dx < 0 else 'right'}")
    return out


def make_questions(data: ShapesData, *, seed: int, per_image: int = 1, phrasing: str = "random") -> list[Question]:
    """Questions about the images of ``data``.

    Args:
        seed: seeds the choice of question types and phrasings.
        per_image: question types asked per image (1..3), drawn without replacement among the types
            that have an answer for that image.
        phrasing: "random" (any phrasing of the type) or "first" (the first phrasing: the demo recording).

    Returns:
        Questions in image order.
    """
    rng = np.random.default_rng(seed)
    colours, places = colour_names(data), positions(data)
    out: list[Question] = []
    for i in range(len(data)):
        answers = {"shape": CLASS_NAMES[int(data.labels[i])], "colour": colours[i], "position": places[i]}
        kinds = [k for k in QUESTION_TYPES if answers[k] is not None]
        take = rng.permutation(len(kinds))[: max(1, min(per_image, len(kinds)))]
        for j in sorted(take):
            kind = kinds[int(j)]
            options = QUESTIONS[kind]
            prompt = options[0] if phrasing == "first" else options[int(rng.integers(len(options)))]
            out.append(Question(i, kind, prompt, str(answers[kind])))
    return out


def vocabulary() -> list[str]:
    """Every token of the demo tokenizer, specials first (ids 0..4: pad, bos, eos, image, unk)."""
    words: list[str] = list(SPECIAL_TOKENS) + list(PROMPT_WORDS)
    for phrasings in QUESTIONS.values():
        for q in phrasings:
            words += q.replace("?", " ?").split()
    words += [w for name in (*CLASS_NAMES, *COLOUR_NAMES, *POSITION_NAMES) for w in name.split()]
    return list(dict.fromkeys(words))
