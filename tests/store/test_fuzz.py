"""A permanent fault suite over the golden files: every dataset and attribute deleted in turn, every
attribute's value corrupted, the file truncated at many offsets, bytes flipped. The reader either opens
the file and every read works, or it raises one RecordingError; ``attnviz info`` and ``attnviz analyze``
exit 0 or print one ``error:`` line with exit code 2. Never a traceback.

The mutations are enumerated from the files themselves (h5py ``visititems``), so the suite grows with
the format and cannot drift from it. It runs in-process on copies of the small golden files (seconds).
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable, Iterator

import h5py
import numpy as np
import pytest

import attnviz
from attnviz.errors import AttnvizError

DATA = Path(__file__).resolve().parents[1] / "data"
GOLDEN = ("golden_v1.h5", "golden_v1_s2t.h5")
#: values written over an attribute: wrong type, wrong range, broken JSON, empty, a big number
BAD_VALUES = ("garbage", -1, 10**12, "{not json", "", 2.5, np.array([1, 2, 3]))
TRUNCATIONS = 24
FLIPS = 24

Mutation = Callable[[h5py.File], None]


def _objects(path: Path) -> tuple[list[str], list[tuple[str, str]]]:
    """(dataset paths, (object path, attribute name)) of a file; "/" is the root."""
    datasets: list[str] = []
    attrs: list[tuple[str, str]] = []
    with h5py.File(path, "r") as f:
        attrs += [("/", a) for a in f.attrs]

        def visit(name: str, obj: object) -> None:
            if isinstance(obj, h5py.Dataset):
                datasets.append(name)
            attrs.extend((name, a) for a in obj.attrs)  # type: ignore[attr-defined]

        f.visititems(visit)
    return datasets, attrs


def _h5_mutations(path: Path) -> Iterator[tuple[str, Mutation]]:
    datasets, attrs = _objects(path)
    for d in datasets:
        yield f"delete dataset {d}", lambda f, d=d: f.__delitem__(d)
    for i, (obj, a) in enumerate(attrs):
        yield f"delete attribute {obj}@{a}", lambda f, obj=obj, a=a: f[obj].attrs.__delitem__(a)
        # three bad values per attribute, rotating, so that every value meets every kind of attribute
        # over the file while the suite stays fast
        for v in (BAD_VALUES[(i + k) % len(BAD_VALUES)] for k in range(3)):
            def corrupt(f: h5py.File, obj: str = obj, a: str = a, v: object = v) -> None:
                f[obj].attrs[a] = v
            yield f"set {obj}@{a} = {v!r}", corrupt
    for d in datasets:  # a dataset replaced by one of another shape (the contract's shapes)
        def reshape(f: h5py.File, d: str = d) -> None:
            old = f[d]
            dtype = old.dtype
            del f[d]
            f.create_dataset(d, shape=(1,), dtype=dtype if dtype.kind != "O" else h5py.string_dtype())
        yield f"reshape dataset {d} to (1,)", reshape


def _exercise(path: Path) -> None:
    """Open and read everything a page or a command reads; only RecordingError may come out."""
    try:
        rec = attnviz.open(path)
    except AttnvizError:
        return
    try:
        with rec:
            rec.sample_ids(), rec.labels(), rec.predictions(), rec.class_names(), rec.skipped(), rec.accuracy
            for kind in rec.kinds():
                rec.layout(kind), rec.stack_shape(kind)
                for s in range(rec.n_samples):
                    L, H = rec.stack_shape(kind)
                    rec.attention(s, L - 1, H - 1, kind=kind)
                    rec.lengths(s, kind)
                for _ in rec.iter_attention(kind, batch_size=2):
                    pass
            for m in rec.head_metrics():
                rec.head_metric(m), rec.head_metric_info(m)
            for m in rec.attribution_methods():
                rec.attribution_info(m)
                if rec.n_samples:
                    rec.attribution(0, m)
            for s in range(rec.n_samples):
                rec.meta(s), rec.logits(s)
                if rec.family in ("vit", "lvlm"):
                    rec.thumbnail(s), rec.mask(s)
    except AttnvizError:
        pass


def _cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    from attnviz.cli import main

    with pytest.raises(SystemExit) as e:
        main(list(args))
        raise SystemExit(0)
    out = capsys.readouterr()
    return int(e.value.code or 0), out.err


def _check_cli(capsys: pytest.CaptureFixture[str], path: Path, label: str, json: bool = False) -> None:
    for args in (("info", str(path)),) + ((("info", str(path), "--json"),) if json else ()):
        code, err = _cli(capsys, *args)
        assert code in (0, 2), f"{label}: {args} exit {code}"
        assert "Traceback" not in err, f"{label}: {err[-500:]}"
        if code == 2:
            lines = [line for line in err.splitlines() if line.strip()]
            assert len(lines) == 1 and lines[0].startswith("error: "), f"{label}: {err!r}"


def _copy(tmp_path: Path, name: str) -> Path:
    dst = tmp_path / name
    shutil.copyfile(DATA / name, dst)
    return dst


@pytest.mark.parametrize("name", GOLDEN)
def test_every_deletion_and_corruption_gives_a_clean_error(name: str, tmp_path: Path,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    work = tmp_path / "m.h5"
    n = 0
    for label, mutate in _h5_mutations(DATA / name):
        shutil.copyfile(DATA / name, work)
        with h5py.File(work, "r+") as f:
            mutate(f)
        _exercise(work)
        _check_cli(capsys, work, label, json=n % 5 == 0)
        n += 1
    assert n > 100  # every dataset and attribute of the golden file was visited


@pytest.mark.parametrize("name", GOLDEN)
def test_truncated_and_bit_flipped_files_give_a_clean_error(name: str, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture[str]) -> None:
    raw = (DATA / name).read_bytes()
    work = tmp_path / "m.h5"
    rng = np.random.default_rng(0)
    cuts = sorted(set(np.linspace(0, len(raw) - 1, TRUNCATIONS).astype(int).tolist()))
    for cut in cuts:
        work.write_bytes(raw[:cut])
        _exercise(work)
        _check_cli(capsys, work, f"truncated at {cut}")
    for offset in rng.choice(len(raw), FLIPS, replace=False):
        data = bytearray(raw)
        data[int(offset)] ^= 0xFF
        work.write_bytes(bytes(data))
        _exercise(work)
        _check_cli(capsys, work, f"byte {offset} flipped")


def test_analyze_on_damaged_golden_files_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``attnviz analyze`` (which reads every map and writes results) on a sample of the mutations."""
    raw = (DATA / "golden_v1.h5").read_bytes()
    work = tmp_path / "m.h5"
    rng = np.random.default_rng(1)
    for offset in rng.choice(len(raw), 12, replace=False):
        data = bytearray(raw)
        data[int(offset)] ^= 0xFF
        work.write_bytes(bytes(data))
        code, err = _cli(capsys, "analyze", str(work), "--no-spatial")
        assert code in (0, 2) and "Traceback" not in err, err[-500:]
    for label, mutate in list(_h5_mutations(DATA / "golden_v1.h5"))[::9]:
        shutil.copyfile(DATA / "golden_v1.h5", work)
        with h5py.File(work, "r+") as f:
            mutate(f)
        code, err = _cli(capsys, "analyze", str(work))
        assert code in (0, 2) and "Traceback" not in err, f"{label}: {err[-500:]}"
