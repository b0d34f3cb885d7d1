"""Localization scores (energy inside the mask, pointing game) on hand-built maps and masks."""

from __future__ import annotations

import numpy as np
import pytest

import attnviz
from attnviz.analysis import localization as L
from attnviz.store import AttributionSpec, RecordingWriter, SampleBatch, StackSpec, TokenLayout
from tests.helpers import make_recording


def test_patch_coverage_and_tolerance():
    mask = np.zeros((32, 32), np.uint8)
    mask[0:8, 0:8] = 1          # patch (0, 0) fully
    mask[8:12, 8:16] = 1        # half of patch (1, 1)
    cov = L.patch_coverage(mask, (4, 4))
    assert cov[0] == 1.0 and cov[5] == 0.5 and cov.sum() == 1.5
    assert L.tolerance_px((224, 224)) == 15.0 and L.tolerance_px((64, 48)) == pytest.approx(15 * 64 / 224)
    zone = L.near_mask(mask, 3.0)
    assert zone[0, 10] and not zone[0, 12]  # 3 px right of the mask's edge at column 7 is in, 5 px is not


def test_patch_scores_of_hand_built_maps():
    mask = np.zeros((32, 32), np.uint8)
    mask[0:8, 0:16] = 1  # patches (0, 0) and (0, 1)
    cov, zone = L.patch_coverage(mask, (4, 4)), L.near_mask(mask, 0.0)
    uniform = np.full(16, 1 / 16)
    on = np.zeros(16)
    on[1] = 1.0
    off = np.zeros(16)
    off[15] = 1.0
    energy, hit = L.patch_map_scores(np.stack([uniform, on, off]), cov, zone, (4, 4))
    assert energy.tolist() == [pytest.approx(2 / 16), 1.0, 0.0]  # uniform = the object's area share
    assert hit.tolist()[1:] == [True, False]


def test_pixel_scores_count_the_positive_part():
    mask = np.zeros((16, 16), np.uint8)
    mask[4:8, 4:8] = 1
    zone = L.near_mask(mask, 0.0)
    values = np.where(mask > 0, 2.0, -5.0)  # negative evidence everywhere else is not energy
    values[0, 0] = 1.0
    e, h = L.pixel_map_scores(values, mask, zone)
    assert e == pytest.approx(32 / 33) and h
    assert np.isnan(L.pixel_map_scores(-np.ones((16, 16)), mask, zone)[0])


def test_head_maps_use_cls_or_the_mean_received_attention():
    lay = TokenLayout(n_prefix=1, prefix_names=("cls",), grid=(2, 2), patch_size=(8, 8), image_size=(16, 16))
    maps = np.zeros((1, 1, 5, 5))
    maps[0, 0, 0] = [0.5, 0.5, 0.0, 0.0, 0.0]  # CLS: half on itself, half on patch 0
    got = L.head_query_maps(maps, lay)
    assert got[0, 0].tolist() == [1.0, 0.0, 0.0, 0.0]  # renormalised over the patches
    no_cls = TokenLayout(n_prefix=0, grid=(2, 2), patch_size=(8, 8), image_size=(16, 16))
    m = np.zeros((1, 1, 4, 4))
    m[0, 0, :, 3] = 1.0  # every query attends to patch 3
    assert L.head_query_maps(m, no_cls)[0, 0].tolist() == [0.0, 0.0, 0.0, 1.0]


def _recording(path, *, with_masks=True):
    """2 images of 4x4 patches (32 px); head (0, 0) looks at the object (patch 0), head (0, 1) at patch 15;
    image 1 has an empty mask (left out)."""
    grid, t = (4, 4), 17
    lay = TokenLayout(n_prefix=1, prefix_names=("cls",), grid=grid, patch_size=(8, 8), image_size=(32, 32))
    maps = np.full((2, 1, 2, t, t), 1 / t, np.float32)
    maps[:, 0, 0, 0] = 0.0
    maps[:, 0, 0, 0, 1] = 1.0
    maps[:, 0, 1, 0] = 0.0
    maps[:, 0, 1, 0, 16] = 1.0
    masks = np.zeros((2, 32, 32), np.uint8)
    masks[0, :8, :8] = 1
    sal = np.zeros((2, 32, 32), np.float32)
    sal[:, :8, :8] = 1.0
    sal[:, 24:, 24:] = 1.0  # half of the saliency on the object
    w = RecordingWriter.create(path, family="vit", model_name="m", model_class="ViTModel", sample_ids=["a", "b"],
                               stacks=[StackSpec("self", 1, 2, t, t, lay)], class_names=[], thumbnail_shape=(32, 32),
                               mask_shape=(32, 32) if with_masks else None,
                               attributions=[AttributionSpec("saliency", (32, 32), "pixel", target="embedding_norm")],
                               batch_size=2)
    with w:
        w.write(SampleBatch(start=0, attention={"self": maps}, predictions=np.full(2, -1), logits=np.full((2, 1), np.nan),
                            thumbnails=np.zeros((2, 32, 32, 3), np.uint8), masks=masks if with_masks else None,
                            attributions={"saliency": sal}))
        w.finish()
    return path


def test_recording_scores_heads_and_attributions_and_stores_them(tmp_path):
    path = _recording(tmp_path / "r.h5")
    loc, computed = L.analyze_localization(path)
    assert computed and loc.n_images == 1 and loc.samples.tolist() == [0]
    assert loc.energy[0].tolist() == [1.0, 0.0] and loc.hit[0].tolist() == [1.0, 0.0]
    assert loc.baseline_energy == pytest.approx(1 / 16)
    assert loc.method_energy == {"saliency": pytest.approx(0.5)}
    with attnviz.open(path) as rec:
        assert rec.head_metric("mask_energy").tolist() == [[1.0, 0.0]]
        info = rec.head_metric_info("mask_energy")
        assert "uniform attention: 0.062" in info.definition and "Score-CAM" in info.citation
        assert "15 px" in rec.head_metric_info("pointing_hit").definition
        again = L.load_localization(rec)
        assert again.method_energy == loc.method_energy and again.baseline_pointing == loc.baseline_pointing
    assert L.analyze_localization(path)[1] is False  # cached: same samples and methods


def test_without_masks_nothing_is_scored(tmp_path):
    path = _recording(tmp_path / "r.h5", with_masks=False)
    assert L.analyze_step(path, show_bar=False) == ["localization scores skipped: no object masks"]
    with attnviz.open(make_recording(tmp_path / "m.h5")) as rec:  # synthetic masks: a square per image
        loc = L.compute_localization(rec)
    assert loc is not None and loc.n_images == rec.n_samples and loc.energy.shape == (2, 3)
