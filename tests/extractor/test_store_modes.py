"""``attnviz extract --store full|rows|summary`` and ``--dry-run`` through the real pipeline on tiny ViTs: the
stored rows are exactly the full maps' rows, the head statistics equal, analyses refuse what a mode cannot
give in one line, ``--resume`` refuses another mode, and a dry run writes nothing and estimates the size."""

from __future__ import annotations

import json
from pathlib import Path

import h5py
import numpy as np
import pytest
from PIL import Image

import attnviz
from attnviz.errors import InputError, RecordingError
from extractor.pipeline import ExtractOptions, extract, query_rows
from tests.helpers import interrupted_at_batch, save_tiny_model, write_images

NAMES = ["circle/a.png", "circle/b.png", "square/c.png", "triangle/d.png", "e.png"]
STORE_ROWS = 5


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("store")
    save_tiny_model(root / "vit", "vit")  # 32 px, patch 8: CLS + 4x4 patches, 2 layers x 4 heads
    save_tiny_model(root / "siglip", "siglip_vision", seed=2)  # no prefix token
    write_images(root / "imgs", NAMES, size=(37, 51))
    mask = np.zeros((37, 51), np.uint8)
    mask[:, :25] = 255
    Image.fromarray(mask).save(root / "mask.png")
    lines = [{"image": str(root / "imgs" / n), "mask": "mask.png"} for n in NAMES[:3]]
    (root / "masked.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return root


def run(data: Path, out: Path, **kw):
    opts = dict(model=str(data / "vit"), input=str(data / "imgs"), out=str(out), device="cpu", batch_size=2,
                attributions=("rollout",), progress=False, store_rows=STORE_ROWS)
    opts.update(kw)
    return extract(ExtractOptions(**opts))


@pytest.fixture(scope="module")
def recordings(data, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("recs")
    return {store: run(data, root / f"{store}.h5", store=store, input=str(data / "masked.jsonl")).path
            for store in ("full", "rows", "summary")}


def test_rows_are_exactly_the_full_maps_rows(recordings):
    with attnviz.open(recordings["full"]) as full, attnviz.open(recordings["rows"]) as rows:
        assert (full.store, rows.store) == ("full", "rows")
        n_tokens = full.lengths(0)[0]
        for s in range(full.n_samples):
            expect = query_rows(s, n_tokens, 1, 1 + STORE_ROWS)
            assert expect[0] == 0 and len(expect) == 1 + STORE_ROWS  # CLS + sampled query patches
            assert rows.row_positions(s).tolist() == expect.tolist()
            for layer in range(full.n_layers):
                for head in range(full.n_heads):
                    pos, got = rows.attention_rows(s, layer, head)
                    assert pos.tolist() == expect.tolist()
                    assert np.array_equal(got, full.attention(s, layer, head)[pos])
                    fpos, fgot = full.attention_rows(s, layer, head)  # also on a full file: every row
                    assert np.array_equal(fgot, full.attention(s, layer, head)) and len(fpos) == n_tokens
        assert not np.array_equal(rows.row_positions(0), rows.row_positions(1))  # drawn per sample
        # everything else is recorded as usual
        for name in ("logits", "predictions", "labels"):
            assert np.array_equal(getattr(rows, name)(), getattr(full, name)())
        assert np.array_equal(rows.attribution(2, "rollout"), full.attribution(2, "rollout"))
        assert np.array_equal(rows.thumbnail(1), full.thumbnail(1)) and np.array_equal(rows.mask(0), full.mask(0))


def test_layout_of_each_mode(recordings):
    with h5py.File(recordings["full"]) as f:
        assert f.attrs["store"] == "full" and "maps" in f["attention/self"]
        assert not any(k.startswith("head_") for k in f.get("per_sample", {}))
    with h5py.File(recordings["rows"]) as f:
        g = f["attention/self"]
        assert f.attrs["store"] == "rows" and "maps" not in g
        assert g["rows"].shape == (3, 2, 4, 1 + STORE_ROWS, 17) and g["rows"].dtype == np.float16
        assert g["row_positions"].shape == (3, 1 + STORE_ROWS) and g.attrs["max_lengths"].tolist() == [17, 17]
        assert f["per_sample/head_entropy"].shape == (3, 2, 4)
    with h5py.File(recordings["summary"]) as f:
        g = f["attention/self"]
        assert f.attrs["store"] == "summary" and "maps" not in g and "rows" not in g and "lengths" in g
        assert {"head_entropy", "head_confidence", "head_cls_attention"} <= set(f["per_sample"])
        assert "rollout" in f["attributions"] and "thumbnail" in f["samples"]


def test_head_statistics_equal_on_every_mode(recordings):
    from attnviz.analysis.head_stats import compute_head_stats

    with attnviz.open(recordings["full"]) as full:
        expect = {m: full.head_metric(m) for m in ("entropy", "confidence", "cls_attention")}
        recomputed = compute_head_stats(full)
    for store in ("rows", "summary"):
        with attnviz.open(recordings[store]) as rec:
            for m, values in expect.items():
                assert np.array_equal(rec.head_metric(m), values), (store, m)  # the same accumulator, same maps
            again = compute_head_stats(rec)  # from the per-sample rows (what analyze and --resume use)
            np.testing.assert_allclose(again.entropy, recomputed.entropy, rtol=1e-6)
            np.testing.assert_allclose(again.cls_attention, recomputed.cls_attention, rtol=1e-6, atol=1e-9)


def test_reading_whole_maps_is_refused_with_what_is_stored(recordings):
    with attnviz.open(recordings["rows"]) as rec:
        stored = rec.row_positions(0).tolist()
        with pytest.raises(RecordingError, match=r"stores only query rows \(--store rows\).*query positions "
                                                 + ", ".join(map(str, stored))):
            rec.attention(0, 0, 0)
        with pytest.raises(RecordingError, match="stores only query rows"):
            next(rec.iter_attention())
        unstored = next(q for q in range(17) if q not in stored)
        with pytest.raises(RecordingError, match=f"query {unstored} of sample 0 is not one of them"):
            rec.attention_query(0, 0, unstored)
        assert np.array_equal(rec.attention_query(0, 1, stored[1], head=3), rec.attention_rows(0, 1, 3)[1][1])
    with attnviz.open(recordings["summary"]) as rec:
        with pytest.raises(RecordingError, match=r"only per-head summaries \(--store summary\)"):
            rec.attention_rows(0, 0, 0)
        with pytest.raises(RecordingError, match=r"--store summary"):
            rec.attention(0, 0, 0)
        assert rec.row_positions(0).tolist() == []


def test_analyses_run_what_the_mode_allows_and_say_what_not(recordings, tmp_path):
    import shutil

    from attnviz.analysis.localization import analyze_step as localization_step, load_localization
    from attnviz.analysis.patterns import analyze_step as patterns_step
    from attnviz.analysis.spatial import analyze_step as spatial_step, compute_spatial

    paths = {k: Path(shutil.copy(v, tmp_path / v.name)) for k, v in recordings.items()}
    assert spatial_step(paths["rows"], show_bar=False) == [
        "spatial profiles skipped: this recording stores only query rows (--store rows): the spatial-profile "
        "analysis needs full maps"]
    assert patterns_step(paths["summary"], show_bar=False) == [
        "pattern atlas skipped: this recording stores no attention maps, only per-head summaries (--store summary): "
        "the pattern atlas needs full maps"]
    with attnviz.open(paths["rows"]) as rec, pytest.raises(RecordingError, match="spatial-profile analysis needs"):
        compute_spatial(rec)
    # localization needs only the CLS row: a rows file gives exactly the full file's scores
    assert localization_step(paths["full"], show_bar=False)[0].startswith("localization (self, 3 image(s)")
    assert localization_step(paths["rows"], show_bar=False)[0].startswith("localization (self, 3 image(s)")
    assert localization_step(paths["summary"], show_bar=False) == [
        "localization scores skipped: this recording stores no attention maps, only per-head summaries "
        "(--store summary): the localization analysis needs attention rows (--store rows or full)"]
    with attnviz.open(paths["full"]) as a, attnviz.open(paths["rows"]) as b:
        la, lb = load_localization(a), load_localization(b)
        assert np.array_equal(la.energy, lb.energy) and np.array_equal(la.hit, lb.hit)


def test_a_model_without_prefix_tokens_stores_only_sampled_patch_rows(data, tmp_path):
    out = run(data, tmp_path / "sig.h5", model=str(data / "siglip"), store="rows", store_rows=3, limit=2,
              attributions=()).path
    with attnviz.open(out) as rec:
        assert rec.layout().n_prefix == 0
        for s in range(2):
            assert rec.row_positions(s).tolist() == query_rows(s, 16, 0, 3).tolist()
            assert len(rec.row_positions(s)) == 3
        assert rec.attention_rows(0, 0, 0)[1].shape == (3, 16)


def test_store_rows_larger_than_the_image_keeps_every_row(data, tmp_path):
    out = run(data, tmp_path / "all.h5", store="rows", store_rows=100, limit=1, attributions=()).path
    with attnviz.open(out) as rec:
        assert rec.row_positions(0).tolist() == list(range(17))


def test_resume_refuses_another_store_mode_and_continues_the_same(data, tmp_path, monkeypatch):
    reference = run(data, tmp_path / "ref.h5", store="rows").path
    out = tmp_path / "r.h5"
    with interrupted_at_batch(monkeypatch, 2), pytest.raises(KeyboardInterrupt):
        run(data, out, store="rows")
    with pytest.raises(InputError, match=r"recorded with --store='rows', this run has 'full'"):
        run(data, out, resume=True)
    with pytest.raises(InputError, match=r"recorded with --store-rows=5, this run has 3"):
        run(data, out, resume=True, store="rows", store_rows=3)
    result = run(data, out, resume=True, store="rows")
    assert result.n_recorded == 3
    with h5py.File(out) as got, h5py.File(reference) as ref:
        for name in ("attention/self/rows", "attention/self/row_positions", "per_sample/head_entropy",
                     "samples/logits", "attributions/rollout"):
            assert np.array_equal(got[name][()], ref[name][()]), name
        np.testing.assert_allclose(got["head_metrics/entropy"][()], ref["head_metrics/entropy"][()], rtol=1e-6)


def test_other_families_are_refused_in_one_line(tmp_path):
    from tests.helpers_s2t import save_tiny_whisper, tone, write_clip

    save_tiny_whisper(tmp_path / "whisper")
    write_clip(tmp_path / "a.wav", tone(0.3))
    with pytest.raises(InputError, match=r"--store rows is implemented for image models \(the vit family\); a s2t "
                                         r"model records its full maps: leave --store out"):
        extract(ExtractOptions(model=str(tmp_path / "whisper"), input=str(tmp_path / "a.wav"),
                               out=str(tmp_path / "x.h5"), store="rows", progress=False))
    assert list(tmp_path.glob("x.h5*")) == []
