"""Input enumeration: image file, folder (recursive, class folders), JSONL/CSV manifests, damaged files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from attnviz.errors import InputError
from extractor.inputs import ClassMatcher, collect_images
from tests.helpers import write_images

CLASSES = ["circle", "square", "triangle", "big_ring"]


def collect(path, **kw):
    warnings: list[str] = []
    result = collect_images(path, class_names=CLASSES, warn=warnings.append, **kw)
    return result, warnings


def corrupt(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"garbage" * 10)
    return path


def test_class_matcher_names_indices_and_normalisation():
    m = ClassMatcher(CLASSES)
    assert m.match("Circle") == 0 and m.match("big-ring") == 3 and m.match("Big Ring") == 3
    assert m.match(2) == 2 and m.match("2") == 2 and m.match(2.0) == 2
    assert m.match("dog") is None and m.match(4) is None and m.match(-1) is None and m.match(True) is None


def test_folder_recursive_sorted_with_class_labels(tmp_path):
    write_images(tmp_path, ["Square/b.png", "circle/z/deep.jpg", "circle/a.PNG", "top.bmp", "2/x.webp",
                            "dogs/d.png"])
    (tmp_path / "notes.txt").write_text("not an image")
    s, warnings = collect(tmp_path)
    assert s.ids == ["2/x.webp", "Square/b.png", "circle/a.PNG", "circle/z/deep.jpg", "dogs/d.png", "top.bmp"]
    assert [it.label for it in s.items] == [2, 1, 0, 0, -1, -1]
    assert s.has_labels and not s.has_masks and s.skipped == ()
    assert len(warnings) == 1 and "dogs" in warnings[0] and "no label" in warnings[0]


def test_corrupt_images_are_skipped_and_listed(tmp_path):
    write_images(tmp_path, ["a.png", "c.png"])
    corrupt(tmp_path / "b.png")
    s, warnings = collect(tmp_path)
    assert s.ids == ["a.png", "c.png"]
    assert [sid for sid, _ in s.skipped] == ["b.png"] and "cannot be read" in s.skipped[0][1]
    assert warnings == [f"skipped b.png: {s.skipped[0][1]}"]


def test_every_image_corrupt_is_an_error(tmp_path):
    corrupt(tmp_path / "a.png")
    corrupt(tmp_path / "b.jpg")
    with pytest.raises(InputError, match=r"none of the 2 image\(s\).*could be read"):
        collect(tmp_path)


def test_limit_counts_readable_images(tmp_path):
    write_images(tmp_path, ["a.png", "c.png", "d.png"])
    corrupt(tmp_path / "b.png")
    s, _ = collect(tmp_path, limit=2)
    assert s.ids == ["a.png", "c.png"] and [x for x, _ in s.skipped] == ["b.png"]
    s, _ = collect(tmp_path, limit=1)
    assert s.ids == ["a.png"] and s.skipped == ()
    with pytest.raises(InputError, match="--limit must be at least 1"):
        collect(tmp_path, limit=0)


def test_empty_folder_missing_path_and_other_files(tmp_path):
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("x")
    with pytest.raises(InputError, match="holds no images"):
        collect(tmp_path / "empty")
    with pytest.raises(InputError, match="does not exist"):
        collect(tmp_path / "nope")
    with pytest.raises(InputError, match="is not an image"):
        collect(tmp_path / "empty" / "readme.txt")


def test_single_image_file(tmp_path):
    (p,) = write_images(tmp_path, ["sub/one.jpg"])
    s, _ = collect(p)
    assert s.ids == ["one.jpg"] and s.items[0].path == p and s.items[0].label == -1


def test_jsonl_manifest_labels_masks_relative_paths(tmp_path):
    write_images(tmp_path / "data", ["imgs/a.png", "imgs/b.png", "imgs/c.png", "m/a.png"])
    lines = [{"image": "imgs/a.png", "label": "square", "mask": "m/a.png"},
             {"image": "imgs/b.png", "label": 2},
             {"image": "imgs/c.png"}]
    man = tmp_path / "data" / "set.jsonl"
    man.write_text("\n".join(json.dumps(x) for x in lines) + "\n\n")
    s, _ = collect(man)
    assert s.ids == ["imgs/a.png", "imgs/b.png", "imgs/c.png"]
    assert [it.label for it in s.items] == [1, 2, -1]
    assert s.items[0].mask == tmp_path / "data" / "m" / "a.png" and s.items[1].mask is None and s.has_masks


def test_csv_manifest(tmp_path):
    write_images(tmp_path, ["a.png", "b.png"])
    (tmp_path / "set.csv").write_text("image, label\na.png,Triangle\nb.png,\n")
    s, _ = collect(tmp_path / "set.csv")
    assert [it.label for it in s.items] == [2, -1]


@pytest.mark.parametrize("content, message", [
    ('{"image": "missing.png"}', r"line 1: image missing.png not found"),
    ('{"image": "a.png"}\n{"image": "a.png", "label": "dog"}', r"line 2: label 'dog' is not a class"),
    ('{"image": "a.png", "label": 9}', r"line 1: label 9 is not a class"),
    ('{"image": "a.png", "mask": "nomask.png"}', r"line 1: mask nomask.png not found"),
    ('{"label": 1}', r"line 1: no 'image' path"),
    ('{"image": "a.png",', r"line 1: not valid JSON"),
    ('["a.png"]', r"line 1: expected a JSON object"),
    ("", r"lists no inputs"),
])
def test_bad_jsonl_manifests(tmp_path, content, message):
    write_images(tmp_path, ["a.png"])
    (tmp_path / "m.jsonl").write_text(content)
    with pytest.raises(InputError, match=message):
        collect(tmp_path / "m.jsonl")


def test_bad_csv_manifests(tmp_path):
    write_images(tmp_path, ["a.png"])
    (tmp_path / "m.csv").write_text("path,label\na.png,1\n")
    with pytest.raises(InputError, match="must name an 'image' column"):
        collect(tmp_path / "m.csv")
    (tmp_path / "m.csv").write_text("image,label\na.png,1\nb.png,0\n")
    with pytest.raises(InputError, match="line 3: image b.png not found"):
        collect(tmp_path / "m.csv")


def test_corrupt_image_in_manifest_is_skipped_but_unreadable_mask_is_an_error(tmp_path):
    write_images(tmp_path, ["a.png"])
    corrupt(tmp_path / "b.png")
    (tmp_path / "m.jsonl").write_text('{"image": "a.png"}\n{"image": "b.png"}\n')
    s, warnings = collect(tmp_path / "m.jsonl")
    assert s.ids == ["a.png"] and s.skipped[0][0] == "b.png" and len(warnings) == 1
    corrupt(tmp_path / "mask.png")
    (tmp_path / "m.jsonl").write_text('{"image": "a.png", "mask": "mask.png"}\n')
    with pytest.raises(InputError, match="mask .*mask.png of a.png cannot be read"):
        collect(tmp_path / "m.jsonl")
