"""docs/file-format.md and attnviz/store/schema.py name the same things."""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path

import pytest

from attnviz.store import schema as S

DOC = (Path(__file__).resolve().parents[2] / "docs" / "file-format.md").read_text()

NAMES = {k: v for k, v in vars(S).items()
         if isinstance(v, str) and k.split("_")[0] in ("ATTR", "D", "G")
         or k in ("MAPS", "LENGTHS", "QUERIES", "KEYS", "QK_POSITIONS")}


def _in_code(value: str) -> bool:
    """`value`, `/value` or `value/...` somewhere in a code span."""
    return re.search(r"`/?" + re.escape(value) + r"(/[^`\n]*)?`", DOC) is not None


@pytest.mark.parametrize("const", sorted(NAMES))
def test_every_schema_name_is_documented(const: str) -> None:
    assert _in_code(NAMES[const]), f"{const} = {NAMES[const]!r} is not in docs/file-format.md"


def test_values_and_enumerations_are_documented() -> None:
    values = [S.FORMAT_NAME, S.PARTIAL_SUFFIX, *S.FAMILIES, *S.COMPRESSIONS, *S.TARGET_SOURCES, *S.RESOLUTIONS]
    values += [k for kinds in S.FAMILY_KINDS.values() for k in kinds]
    values += [f.name for f in fields(S.TokenLayout)]
    assert [v for v in values if not _in_code(v)] == []
    assert f'"{S.HDF5_LIBVER_LOW}"' in DOC and f"must be `{S.FORMAT_VERSION}`" in DOC.lower()


def test_root_attribute_table_marks_exactly_the_required_ones() -> None:
    rows = dict(re.findall(r"^\| `(\w+)` \| [^|]+ \| ([^|]+) \|", DOC, re.M))
    root = {v for k, v in vars(S).items() if k.startswith("ATTR_") and k in {
        "ATTR_FORMAT", "ATTR_VERSION", "ATTR_FAMILY", "ATTR_MODEL_NAME", "ATTR_MODEL_CLASS", "ATTR_CREATED",
        "ATTR_COMPLETE", "ATTR_N_SAMPLES", "ATTR_N_LAYERS", "ATTR_N_HEADS", "ATTR_MAIN_KIND", "ATTR_PRODUCER",
        "ATTR_BATCH_SIZE", "ATTR_PARAMS", "ATTR_TARGET_SOURCE"}}
    assert root <= rows.keys()
    required = {k for k in root if rows[k].strip() == "yes"}
    assert required == set(S.REQUIRED_ROOT_ATTRS)


def test_family_table_lists_kinds_main_first() -> None:
    for family, kinds in S.FAMILY_KINDS.items():
        row = re.search(r"^\| `" + family + r"` \| (.+)$", DOC, re.M)
        assert row, family
        listed = re.findall(r"`(\w+)`", row.group(1).split("|")[0])
        assert listed[0] == S.MAIN_KIND[family] and set(listed) == set(kinds)


def test_required_datasets_are_listed_under_validation() -> None:
    section = DOC.split("## Validation on open")[1].split("\n## ")[0]
    for name in S.REQUIRED_DATASETS:
        assert f"`/{name}`" in section
