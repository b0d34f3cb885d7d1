"""Enumerating vision-language inputs: a manifest of questions about images.

A ``.jsonl`` or ``.csv`` manifest, one question per line/row, paths relative to the manifest::

    {"image": "imgs/a.png", "prompt": "what colour is the shape?", "answer": "red", "mask": "masks/a.png"}

- ``image`` (required): the image file; a missing file is an error naming the line.
- ``prompt`` (required): the question. It is put into the model's chat template, which adds the image
  placeholder; a prompt that already contains the placeholder (``<image>`` for LLaVA) is used as it is
  (see :mod:`extractor.adapters.lvlm`).
- ``answer`` (optional): the reference answer. The distinct answers, normalised (lowercase, single
  spaces, no trailing ``.``), sorted, become the recording's class names and each question's label, so
  the recording's accuracy is the exact-match answer accuracy.
- ``mask`` (optional): a grayscale object mask (nonzero = object), as for images.
- ``id`` (optional): the sample id; default ``<image>#L<line>`` (an image may be asked several questions).

As for images, every image is decoded once up front; an unreadable one is skipped with a warning (and
listed in the recording) before anything is laid out; if none is readable, that is an error.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from attnviz.errors import InputError
from extractor.inputs import MANIFEST_SUFFIXES, InputSet, _manifest_rows, check_inputs, manifest_file

__all__ = ["VQAInput", "collect_vqa", "normalize_answer"]


@dataclass(frozen=True)
class VQAInput:
    """One question about one image.

    Attributes:
        id: the sample id stored in the file.
        path: the image file.
        prompt: the question as written in the manifest.
        answer: the reference answer as written, or None.
        label: index of the normalised answer in :attr:`InputSet.class_names` (-1: no answer).
        mask: object mask file, or None.
        line: the manifest line (for messages).
    """

    id: str
    path: Path
    prompt: str
    answer: str | None = None
    label: int = -1
    mask: Path | None = None
    line: int = 0


def normalize_answer(text: str) -> str:
    """How answers are compared: lowercase, runs of whitespace as one space, no trailing period."""
    return " ".join(str(text).lower().split()).rstrip(".").strip()


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def collect_vqa(path: str | os.PathLike, *, class_names: Sequence[str] | None = None, limit: int | None = None,
                warn: Callable[[str], None] = _warn, workers: int = 4) -> InputSet:
    """Enumerate and check the questions of a manifest.

    Args:
        path: a ``.jsonl`` or ``.csv`` manifest.
        class_names: ignored (a generative model has no classes; the answers name them).
        limit: keep at most this many questions with a readable image (the first ones in order).
        warn: called with a one-line message per skipped question.
        workers: threads decoding images during the check.

    Returns:
        :class:`~extractor.inputs.InputSet` of :class:`VQAInput`; ``class_names`` = the sorted distinct
        normalised answers.

    Raises:
        InputError: not a manifest, an empty one, a line without image or prompt, a missing image or
            mask file, or no readable image.
    """
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be at least 1, got {limit}")
    src = Path(path).expanduser()
    if not src.exists():
        raise InputError(f"input {path} does not exist")
    if src.is_dir() or src.suffix.lower() not in MANIFEST_SUFFIXES:
        raise InputError(f"input {path}: a vision-language model takes a manifest of questions "
                         f"({', '.join(MANIFEST_SUFFIXES)}) with lines like "
                         '{"image": "a.png", "prompt": "what colour is it?", "answer": "red"}')
    rows = list(_manifest_rows(src))
    if not rows:
        raise InputError(f"manifest {src} lists no questions")
    base = src.parent
    parsed: list[tuple[int, dict, Path, Path | None]] = []
    answers: set[str] = set()
    for line, row in rows:
        where = f"manifest {src.name} line {line}"
        img_path = manifest_file(row, "image", base, where)
        prompt = row.get("prompt")
        if not isinstance(prompt, str) or not prompt.strip():
            raise InputError(f"{where}: no 'prompt' (the question to ask about the image)")
        answer = row.get("answer")
        if isinstance(answer, bool) or (answer is not None and not isinstance(answer, (str, int, float))):
            raise InputError(f"{where}: 'answer' must be text, got {answer!r}")
        if answer is not None and str(answer).strip():
            answers.add(normalize_answer(str(answer)))
        parsed.append((line, row, img_path, manifest_file(row, "mask", base, where, required=False)))
    names = sorted(answers)
    index = {a: i for i, a in enumerate(names)}
    candidates: list[VQAInput] = []
    seen: set[str] = set()
    for line, row, img_path, mask in parsed:
        raw = row.get("answer")
        answer = str(raw).strip() if raw is not None and str(raw).strip() else None
        sid = str(row.get("id") or f"{row['image']}#L{line}")
        if sid in seen:
            raise InputError(f"manifest {src.name} line {line}: id {sid!r} is used twice")
        seen.add(sid)
        candidates.append(VQAInput(id=sid, path=img_path, prompt=str(row["prompt"]).strip(), answer=answer,
                                   label=index[normalize_answer(answer)] if answer is not None else -1,
                                   mask=mask, line=line))
    items, skipped = check_inputs(candidates, path=path, limit=limit, warn=warn, workers=workers,
                                  noun="question(s)")
    return InputSet(tuple(items), tuple(skipped), has_masks=any(it.mask is not None for it in items),
                    class_names=tuple(names))
