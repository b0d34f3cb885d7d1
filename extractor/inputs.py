"""Enumerating image inputs: one file, a folder, or a CSV/JSONL manifest.

- **An image file** (png, jpg, jpeg, webp, bmp): one sample, no label.
- **A folder**, searched recursively, in sorted path order. An image below a first-level subfolder
  whose name is a class of the model (``id2label``; case, ``_``, ``-`` and spaces ignored; or a class
  index) gets that label; images directly in the folder have none.
- **A model without classes** (a backbone without a classification head, ``class_names=None``): the
  labels name their own classes: the first-level subfolders, or the manifest's ``label`` values, sorted,
  become the class names (:attr:`InputSet.class_names`), so a DINOv2 or CLIP recording keeps the
  grouping of the inputs for colouring and filtering.
- **A manifest** (``.jsonl`` or ``.csv``), one input per line/row, paths relative to the manifest::

      {"image": "imgs/a.png", "label": "circle", "mask": "masks/a.png"}

  ``label`` (optional) is a class name or index; ``mask`` (optional) a grayscale PNG, nonzero =
  object. A missing file or a bad label is an error naming the line.

Every image is decoded once up front so that a corrupt or unreadable one is skipped (with a warning,
and listed in the recording) before the recording is laid out; that keeps sample indices fixed,
which ``--resume`` needs. If every image fails, that is an error.
"""

from __future__ import annotations

import csv
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from PIL import Image

from attnviz.errors import InputError

__all__ = ["IMAGE_SUFFIXES", "MANIFEST_SUFFIXES", "ImageInput", "InputSet", "collect_images", "check_inputs", "manifest_file",
           "read_image", "read_images", "read_mask", "ClassMatcher", "first_usable"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
MANIFEST_SUFFIXES = (".jsonl", ".csv")


@dataclass(frozen=True)
class ImageInput:
    """One image to record.

    Attributes:
        id: the sample id stored in the file: path relative to the input folder or as written in
            the manifest (the file name for a single image).
        path: the image file.
        label: class index, -1 when unknown.
        mask: object mask file (grayscale, nonzero = object), or None.
    """

    id: str
    path: Path
    label: int = -1
    mask: Path | None = None


@dataclass(frozen=True)
class InputSet:
    """The inputs of one extraction, in recording order.

    Attributes:
        items: the readable images (at most ``limit``).
        skipped: (id, reason) of images that could not be read.
        has_masks: some item has a mask (masks are recorded for all; missing ones are all zero).
        class_names: the names the labels index: the model's classes, or for a model without classes
            the names found in the inputs (sorted).
    """

    items: tuple[ImageInput, ...]
    skipped: tuple[tuple[str, str], ...] = ()
    has_masks: bool = False
    class_names: tuple[str, ...] = ()

    @property
    def has_labels(self) -> bool:
        return any(it.label >= 0 for it in self.items)

    @property
    def ids(self) -> list[str]:
        return [it.id for it in self.items]


def _warn(message: str) -> None:
    print(f"warning: {message}", file=sys.stderr)


def _norm(name: str) -> str:
    return " ".join(name.lower().replace("_", " ").replace("-", " ").split())


class ClassMatcher:
    """Maps a label given as a class name or an index onto the model's class indices."""

    def __init__(self, class_names: Sequence[str], *, names_only: bool = False) -> None:
        # names_only: the classes were named by the inputs themselves; a label 3 means the class "3"
        self.names_only = names_only
        self.class_names = list(class_names)
        self._by_name = {}
        for i, n in enumerate(self.class_names):
            self._by_name.setdefault(_norm(str(n)), i)

    def match(self, value: object) -> int | None:
        """Class index of ``value`` (a name, an int, or a string of an int), None if it is neither."""
        if isinstance(value, bool):
            return None
        if self.names_only:
            text = str(int(value)) if isinstance(value, float) and value.is_integer() else str(value).strip()
            return self._by_name.get(_norm(text))
        if isinstance(value, int):
            return value if 0 <= value < len(self.class_names) else None
        if isinstance(value, float) and value.is_integer():
            return self.match(int(value))
        if isinstance(value, str):
            hit = self._by_name.get(_norm(value))
            if hit is not None:
                return hit
            text = value.strip()
            if text.lstrip("-").isdigit():
                return self.match(int(text))
        return None

    def describe(self, limit: int = 10) -> str:
        names = ", ".join(self.class_names[:limit]) + (" ..." if len(self.class_names) > limit else "")
        return f"{names} or an index 0..{len(self.class_names) - 1}" if self.class_names else "none"


def read_image(path: Path) -> Image.Image:
    """Decode one image as RGB (raises OSError/ValueError on damaged files)."""
    with Image.open(path) as im:
        im.load()
        return im.convert("RGB")


def read_images(items: Sequence[ImageInput]) -> list[Image.Image]:
    """Decode a batch of inputs that were readable when the run started (an adapter's ``prepare``).

    Raises:
        InputError: one of them cannot be read now (the input changed during the run).
    """
    images = []
    for it in items:
        try:
            images.append(read_image(it.path))
        except Exception as e:
            raise InputError(f"{it.id} could be read when the run started but not now ({e}); "
                             "did the input change?") from None
    return images


def read_mask(path: Path) -> Image.Image:
    """Decode one mask as 8-bit grayscale ("L")."""
    with Image.open(path) as im:
        im.load()
        return im.convert("L")


def _problem(path: Path) -> str | None:
    """Why ``path`` cannot be used as an image, or None if it decodes."""
    try:
        read_image(path)
    except Exception as e:  # PIL raises many types for damaged files: all mean "skip it"
        text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        return f"cannot be read as an image ({text})"
    return None


def collect_images(path: str | os.PathLike, *, class_names: Sequence[str] | None, limit: int | None = None,
                   warn: Callable[[str], None] = _warn, workers: int = 4) -> InputSet:
    """Enumerate and check the images of ``path`` (file, folder or manifest).

    Args:
        path: an image, a folder of images, or a ``.jsonl``/``.csv`` manifest.
        class_names: the model's classes (index -> name), to resolve labels; None for a model without
            classes (the labels found in the inputs name the classes).
        limit: keep at most this many readable images (the first ones in order).
        warn: called with a one-line message per skipped input or unmatched label folder.
        workers: threads decoding images during the check.

    Raises:
        InputError: missing input, empty folder, bad manifest (missing file, bad label), not an
            image, or no image readable.
    """
    if limit is not None and limit < 1:
        raise InputError(f"--limit must be at least 1, got {limit}")
    src = Path(path).expanduser()
    if not src.exists():
        raise InputError(f"input {path} does not exist")
    found = class_names is None
    if found:
        class_names = _found_label_names(src)
    matcher = ClassMatcher(class_names, names_only=found)
    if src.is_dir():
        candidates = _folder(src, matcher, warn)
    elif src.suffix.lower() in MANIFEST_SUFFIXES:
        candidates = _manifest(src, matcher)
    elif src.suffix.lower() in IMAGE_SUFFIXES:
        candidates = [ImageInput(src.name, src)]
    else:
        raise InputError(f"input {path} is not an image ({', '.join(IMAGE_SUFFIXES)}), a folder, "
                         f"or a manifest ({', '.join(MANIFEST_SUFFIXES)})")
    items, skipped = check_inputs(candidates, path=path, limit=limit, warn=warn, workers=workers)
    return InputSet(tuple(items), tuple(skipped), has_masks=any(it.mask is not None for it in items),
                    class_names=tuple(str(n) for n in class_names))


def _found_label_names(src: Path) -> list[str]:
    """Class names of inputs for a model without classes: first-level subfolders that hold images, or
    the distinct manifest labels, sorted (numbers as their text)."""
    if src.is_dir():
        return sorted({p.relative_to(src).parts[0] for p in src.rglob("*")
                       if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and len(p.relative_to(src).parts) > 1})
    if src.suffix.lower() in MANIFEST_SUFFIXES:
        names = set()
        for _, row in _manifest_rows(src):
            raw = row.get("label")
            if raw is not None and raw != "" and not isinstance(raw, bool):
                names.add(str(int(raw)) if isinstance(raw, float) and raw.is_integer() else str(raw).strip())
        return sorted(names)
    return []


def check_inputs(candidates: Sequence[Any], *, path: str | os.PathLike, limit: int | None,
                 warn: Callable[[str], None], workers: int, noun: str = "image(s)") -> tuple[list[Any], list[tuple[str, str]]]:
    """Decode the candidates (anything with ``id``, ``path`` and ``mask``) until ``limit`` readable ones are
    found, warn about each skipped one, and check that the masks of those kept can be read.

    Raises:
        InputError: none readable, or a mask that cannot be read.
    """
    items, skipped = _check(list(candidates), limit, workers)
    for sid, why in skipped:
        warn(f"skipped {sid}: {why}")
    if not items:
        raise InputError(f"none of the {len(candidates)} {noun} in {path} could be read "
                         f"(first: {skipped[0][0]}: {skipped[0][1]})")
    for it in items:
        if it.mask is not None:
            try:
                read_mask(it.mask)
            except Exception as e:  # PIL raises many types for damaged files
                raise InputError(f"mask {it.mask} of {it.id} cannot be read ({str(e).splitlines()[0]})") from None
    return items, skipped


def _check(candidates: list[ImageInput], limit: int | None,
           workers: int) -> tuple[list[ImageInput], list[tuple[str, str]]]:
    """Decode candidates in order (in parallel) until ``limit`` readable ones are found."""
    return first_usable(candidates, lambda c: _problem(c.path), lambda c, why: c if why is None else why,
                        ident=lambda c: c.id, limit=limit, workers=workers)


def first_usable(candidates: Sequence[Any], probe: Callable[[Any], Any], accept: Callable[[Any, Any], Any], *,
                 ident: Callable[[Any], str], limit: int | None,
                 workers: int) -> tuple[list[Any], list[tuple[str, str]]]:
    """The first ``limit`` usable inputs of ``candidates`` (all when None), in order, and the skipped ones.

    ``probe(candidate)`` (the slow part: decoding a file) runs in ``workers`` threads, a block at a time, so
    that a limit stops early; ``accept(candidate, probe_result)`` (in order, this thread) returns the input
    to keep or a string saying why it is skipped, and may raise InputError for a fault of the whole set.

    Returns:
        (kept inputs, [(ident(candidate), why skipped)]).
    """
    items: list[Any] = []
    skipped: list[tuple[str, str]] = []
    want = len(candidates) if limit is None else limit
    step = max(16, 4 * workers)
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for start in range(0, len(candidates), step):
            block = candidates[start : start + step]
            for c, result in zip(block, pool.map(probe, block)):
                if len(items) >= want:
                    break
                kept = accept(c, result)
                if isinstance(kept, str):
                    skipped.append((ident(c), kept))
                else:
                    items.append(kept)
            if len(items) >= want:
                break
    return items, skipped


def _folder(root: Path, matcher: ClassMatcher, warn: Callable[[str], None]) -> list[ImageInput]:
    files = sorted((p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
                   key=lambda p: p.relative_to(root).as_posix())
    if not files:
        raise InputError(f"input folder {root} holds no images ({', '.join(IMAGE_SUFFIXES)})")
    out: list[ImageInput] = []
    unmatched: set[str] = set()
    for p in files:
        rel = p.relative_to(root)
        label = -1
        if len(rel.parts) > 1:
            hit = matcher.match(rel.parts[0])
            if hit is None:
                unmatched.add(rel.parts[0])
            else:
                label = hit
        out.append(ImageInput(rel.as_posix(), p, label))
    if unmatched:
        warn(f"subfolder(s) {', '.join(sorted(unmatched)[:5])}{' ...' if len(unmatched) > 5 else ''} "
             f"match no class of the model ({matcher.describe()}): their images have no label")
    return out


def _manifest(path: Path, matcher: ClassMatcher) -> list[ImageInput]:
    rows = list(_manifest_rows(path))
    if not rows:
        raise InputError(f"manifest {path} lists no inputs")
    base = path.parent
    out: list[ImageInput] = []
    for line, row in rows:
        where = f"manifest {path.name} line {line}"
        img_path = manifest_file(row, "image", base, where)
        image = row["image"]
        label = -1
        raw = row.get("label")
        if raw is not None and raw != "":
            hit = matcher.match(raw)
            if hit is None:
                raise InputError(f"{where}: label {raw!r} is not a class of the model ({matcher.describe()})")
            label = hit
        out.append(ImageInput(image, img_path, label, manifest_file(row, "mask", base, where, required=False)))
    return out


def manifest_file(row: dict, key: str, base: Path, where: str, *, required: bool = True) -> Path | None:
    """The file a manifest row names under ``key`` (relative to the manifest's folder ``base``); None when an
    optional one is not given.

    Raises:
        InputError: naming the line (``where``): a required path missing, or a file that does not exist.
    """
    value = row.get(key)
    if not value or (isinstance(value, str) and not value.strip()):
        if required:
            raise InputError(f"{where}: no {key!r} path")
        return None
    if not isinstance(value, str):
        raise InputError(f"{where}: {key!r} must be a path, got {value!r}")
    path = base / value
    if not path.is_file():
        raise InputError(f"{where}: {key} {value} not found (paths are relative to the manifest)")
    return path


def _manifest_rows(path: Path, column: str = "image") -> Iterable[tuple[int, dict]]:
    """(line number, row) of a JSONL/CSV manifest whose inputs are in ``column`` ("image", "audio")."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"manifest {path} cannot be read ({e})") from None
    if path.suffix.lower() == ".jsonl":
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise InputError(f"manifest {path.name} line {i}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict):
                raise InputError(f"manifest {path.name} line {i}: expected a JSON object like "
                                 + ('{"image": "a.png", "label": 3}' if column == "image" else
                                    f'{{"{column}": "...", ...}}'))
            yield i, row
    else:
        reader = csv.DictReader(text.splitlines())
        if not reader.fieldnames or column not in [f.strip() for f in reader.fieldnames]:
            raise InputError(f"manifest {path.name}: the CSV header must name an '{column}' column")
        for i, row in enumerate(reader, 2):
            yield i, {(k or "").strip(): (v.strip() if isinstance(v, str) else v) for k, v in row.items()}
