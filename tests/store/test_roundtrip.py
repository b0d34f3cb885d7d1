"""Round trip: what the writer was given is what attnviz.open reads back."""

from __future__ import annotations

import io
from pathlib import Path

import h5py
import numpy as np
import pytest

import attnviz
from attnviz.store import HeadMetricInfo, TokenLayout, write_head_metric
from tests.store._synth import CLASS_NAMES, Written, f16, write_s2t, write_vit


@pytest.mark.parametrize("compression", ["lzf", "gzip", "none"])
def test_maps_and_per_sample_data_round_trip(tmp_path: Path, compression: str) -> None:
    w = write_vit(tmp_path / "r.h5", compression=compression)
    maps = w.maps["self"]
    n, L, H, T, _ = maps.shape
    with attnviz.open(w.path) as rec:
        assert (rec.family, rec.model_name, rec.model_class) == ("vit", "synthetic-vit", "ViTForImageClassification")
        assert (rec.n_samples, rec.n_planned, rec.n_layers, rec.n_heads) == (n, n, L, H)
        assert rec.complete and rec.format_version == 1 and rec.main_kind == "self"
        assert rec.kinds() == ("self",) and rec.stack_shape() == rec.stack_shape("self") == (L, H)
        for s in range(n):
            for layer in range(L):
                for head in range(H):
                    a = rec.attention(s, layer, head)
                    assert a.dtype == np.float32 and a.shape == (T, T)
                    np.testing.assert_array_equal(a, f16(maps[s, layer, head]))
                    np.testing.assert_allclose(a.sum(-1), 1.0, atol=3e-3)
            np.testing.assert_array_equal(rec.attention_heads(s, 1), f16(maps[s, 1]))
            np.testing.assert_array_equal(rec.thumbnail(s), w.thumbnails[s])
            np.testing.assert_array_equal(rec.mask(s), w.masks[s])
            np.testing.assert_array_equal(rec.attribution(s, "saliency"), w.attributions["saliency"][s])
            np.testing.assert_array_equal(rec.attribution(s, "rollout"), w.attributions["rollout"][s])
            np.testing.assert_array_equal(rec.logits(s), w.logits[s])
            assert rec.meta(s) == w.meta[s]
            assert rec.lengths(s) == (T, T)
        np.testing.assert_array_equal(rec.logits(), w.logits)
        np.testing.assert_array_equal(rec.logits(slice(2, 5)), w.logits[2:5])
        np.testing.assert_array_equal(rec.logits(slice(None, None, -2)), w.logits[::-2])
        np.testing.assert_array_equal(rec.labels(), w.labels)
        np.testing.assert_array_equal(rec.predictions(), w.predictions)
        assert rec.sample_ids() == w.ids
        assert rec.class_names() == list(CLASS_NAMES)
        assert rec.skipped() == [("broken.png", "cannot identify image file")]
        assert rec.extraction_params == {"seed": 0, "note": "synthetic"}
        assert rec.target_source == "label"
        assert rec.attribution_methods() == ["rollout", "saliency"]
        info = rec.attribution_info("rollout")
        assert (info.shape, info.resolution, info.target) == ((3, 3), "patch", "label")
        sal = rec.attribution_info("saliency")
        assert (sal.shape, sal.resolution, sal.target, sal.description) == ((12, 12), "pixel", "predicted",
                                                                            "captum Saliency")
        assert rec.layout() == TokenLayout(n_prefix=1, prefix_names=("cls",), grid=(3, 3), patch_size=(4, 4),
                                           image_size=(12, 12))
        assert rec.layout().n_tokens == T


def test_accuracy_ignores_unlabelled_samples(vit: Written) -> None:
    known = vit.labels >= 0
    expected = float(np.mean(vit.predictions[known] == vit.labels[known]))
    with attnviz.open(vit.path) as rec:
        assert rec.has_labels
        assert rec.accuracy == pytest.approx(expected)


def test_accuracy_by_hand(tmp_path: Path) -> None:
    # 7 samples: labels from the synthetic data, predictions forced: 4 of the 6 labelled are right
    from tests.store._synth import create_vit, vit_batch, vit_data

    d = vit_data(7)
    d["labels"][:] = [0, -1, 2, 3, 1, 1, 0]
    d["predictions"] = np.array([0, 3, 2, 0, 1, 2, 0], np.int32)
    w = create_vit(tmp_path / "acc.h5", d, batch_size=7)
    w.write(vit_batch(d, 0, 7))
    w.finish()
    with attnviz.open(tmp_path / "acc.h5") as rec:
        assert rec.accuracy == pytest.approx(4 / 6)


def test_no_labels_means_no_accuracy(s2t: Written) -> None:
    with attnviz.open(s2t.path) as rec:
        assert not rec.has_labels and rec.accuracy is None
        assert rec.target_source == "prediction"


def test_attention_query_is_a_row_of_the_map(vit: Written) -> None:
    maps = vit.maps["self"]
    with attnviz.open(vit.path) as rec:
        row = rec.attention_query(4, 1, query=0, head=2)
        np.testing.assert_array_equal(row, f16(maps[4, 1, 2, 0]))
        rows = rec.attention_query(4, 1, query=5)
        assert rows.shape == (3, maps.shape[-1])
        np.testing.assert_array_equal(rows, f16(maps[4, 1, :, 5]))
        with pytest.raises(IndexError):
            rec.attention_query(4, 1, query=maps.shape[-1])


def test_iter_attention_streams_every_sample_once(vit: Written) -> None:
    maps = vit.maps["self"]
    seen: list[int] = []
    with attnviz.open(vit.path) as rec:
        for idx, batch in rec.iter_attention(batch_size=3):
            assert len(batch) <= 3 and batch.dtype == np.float16
            np.testing.assert_array_equal(batch.astype(np.float32), f16(maps[idx]))
            seen += idx.tolist()
    assert seen == list(range(len(maps)))


@pytest.mark.parametrize("samples", [[6, 1, 4], [5, 2, 2, 0], [3, 4, 5, 6], [0]])
def test_iter_attention_non_contiguous_samples(vit: Written, samples: list[int]) -> None:
    maps = vit.maps["self"]
    got_idx, got = [], []
    with attnviz.open(vit.path) as rec:
        for idx, batch in rec.iter_attention(samples=samples, batch_size=2):
            got_idx += idx.tolist()
            got.append(batch)
    assert got_idx == samples
    np.testing.assert_array_equal(np.concatenate(got).astype(np.float32), f16(maps[samples]))


def test_iter_attention_refuses_samples_out_of_range(vit: Written) -> None:
    with attnviz.open(vit.path) as rec:
        with pytest.raises(IndexError, match="sample 7"):
            list(rec.iter_attention(samples=[0, 7]))
        with pytest.raises(IndexError):
            list(rec.iter_attention(samples=[-1]))
        assert list(rec.iter_attention(samples=[])) == []


def test_out_of_range_and_unknown_kind(vit: Written) -> None:
    with attnviz.open(vit.path) as rec:
        for args in [(7, 0, 0), (-1, 0, 0), (0, 2, 0), (0, 0, 3)]:
            with pytest.raises(IndexError):
                rec.attention(*args)
        with pytest.raises(IndexError):
            rec.thumbnail(7)
        with pytest.raises(KeyError, match="cross"):
            rec.attention(0, 0, 0, kind="cross")
        with pytest.raises(KeyError, match="available: rollout, saliency"):
            rec.attribution(0, "occlusion")
        with pytest.raises(KeyError):
            rec.head_metric("nope")


def test_variable_lengths_are_cropped(s2t: Written) -> None:
    with attnviz.open(s2t.path) as rec:
        assert rec.family == "s2t" and rec.main_kind == "cross" and rec.kinds()[0] == "cross"
        assert set(rec.kinds()) == {"cross", "self", "decoder_self"}
        # n_layers/n_heads describe the main (cross) stack; the encoder has its own shape
        assert (rec.n_layers, rec.n_heads) == (2, 3) == rec.stack_shape("cross")
        assert rec.stack_shape("self") == (3, 2)
        assert rec.layout("cross").key_axis == "frames" and rec.layout("cross").grid is None
        cropped_somewhere = False
        for kind, maps in s2t.maps.items():
            L, H = rec.stack_shape(kind)
            for s in range(rec.n_samples):
                q, k = s2t.lengths[kind][s]
                assert rec.lengths(s, kind) == (q, k)
                cropped_somewhere |= (q, k) != maps.shape[-2:]
                for layer in range(L):
                    for head in range(H):
                        a = rec.attention(s, layer, head, kind=kind)
                        assert a.shape == (q, k)
                        np.testing.assert_array_equal(a, f16(maps[s, layer, head, :q, :k]))
                        np.testing.assert_allclose(a.sum(-1), 1.0, atol=3e-3)
                np.testing.assert_array_equal(rec.attention_heads(s, 0, kind), f16(maps[s, 0, :, :q, :k]))
                assert rec.attention_query(s, 0, q - 1, kind=kind, head=1).shape == (k,)
            # padding is stored as zeros: the stream gives the padded maps
            for idx, batch in rec.iter_attention(kind):
                np.testing.assert_array_equal(batch.astype(np.float32), f16(maps[idx]))
        assert cropped_somewhere
        assert rec.meta(0) == s2t.meta[0]


def test_variable_lengths_without_explicit_lengths(tmp_path: Path) -> None:
    """Maps smaller than the allocated maximum and no lengths: the valid size is the size given."""
    w = write_s2t(tmp_path / "s.h5", explicit_lengths=False)
    with attnviz.open(w.path) as rec:
        for kind in rec.kinds():
            for s in range(rec.n_samples):
                assert rec.lengths(s, kind) == tuple(w.lengths[kind][s])
                q, k = w.lengths[kind][s]
                np.testing.assert_array_equal(rec.attention(s, 1, 1, kind), f16(w.maps[kind][s, 1, 1, :q, :k]))


def test_head_metric_round_trip(vit: Written) -> None:
    values = np.array([[0.5, -1.0, 2.25], [3.0, 0.0, 1e-3]])
    info = HeadMetricInfo("entropy", kind="self", definition="H(a) = -sum a log a", citation="Shannon 1948",
                          units="nats", higher_is_more_important=False, params={"base": "e", "samples": 7})
    write_head_metric(vit.path, info, values)
    with attnviz.open(vit.path) as rec:
        assert rec.head_metrics() == ["entropy"]
        got = rec.head_metric("entropy")
        assert got.dtype == np.float32 and got.shape == (2, 3)
        np.testing.assert_array_equal(got, values.astype(np.float32))
        assert rec.head_metric_info("entropy") == info


def test_one_map_is_one_chunk(tmp_path: Path) -> None:
    w = write_vit(tmp_path / "c.h5", n=4, L=2, H=3, grid=(5, 5), compression="lzf")
    n, L, H, T, _ = w.maps["self"].shape
    with h5py.File(w.path, "r") as f:
        ds = f["attention/self/maps"]
        assert ds.chunks == (1, 1, 1, T, T)
        assert ds.compression == "lzf"
        # every map was written as its own chunk, each at its own place in the file
        assert ds.id.get_num_chunks() == n * L * H
        offsets = {ds.id.get_chunk_info_by_coord((s, layer, h, 0, 0)).byte_offset
                   for s in range(n) for layer in range(L) for h in range(H)}
        assert len(offsets) == n * L * H


def test_reading_one_map_reads_one_chunk(tmp_path: Path) -> None:
    """Count the bytes HDF5 reads from the file: one map costs one chunk, not the dataset."""
    w = write_vit(tmp_path / "c.h5", n=6, L=3, H=4, grid=(7, 7), compression="lzf")

    class CountingFile(io.FileIO):
        bytes_read = 0

        def readinto(self, b):  # type: ignore[no-untyped-def]
            got = super().readinto(b)
            CountingFile.bytes_read += got or 0
            return got

    raw = CountingFile(w.path, "r")
    f = h5py.File(raw, "r")
    try:
        ds = f["attention/self/maps"]
        ds[0, 0, 0]  # warm up: object header and chunk index
        total = ds.id.get_storage_size()
        for s, layer, head in [(3, 1, 2), (5, 2, 3), (1, 0, 1)]:
            chunk = ds.id.get_chunk_info_by_coord((s, layer, head, 0, 0)).size
            CountingFile.bytes_read = 0
            m = ds[s, layer, head]
            assert chunk <= CountingFile.bytes_read <= chunk + 4096 < total / 10
            np.testing.assert_array_equal(m.astype(np.float32), f16(w.maps["self"][s, layer, head]))
    finally:
        f.close()
        raw.close()


def test_gzip_option_compresses_with_gzip(tmp_path: Path) -> None:
    w = write_vit(tmp_path / "g.h5", compression="gzip")
    with h5py.File(w.path, "r") as f:
        assert f["attention/self/maps"].compression == "gzip"
        assert f["samples/thumbnail"].compression == "gzip"


def test_per_sample_arrays_round_trip_padded(tmp_path):
    from attnviz.store import RecordingWriter, SampleBatch, StackSpec, TokenLayout
    from attnviz.store.schema import PerSampleSpec

    lay = TokenLayout(query_axis="tokens", key_axis="frames")
    spec = PerSampleSpec("features", (3, 5), "float16", axes=("mel", "frame"), description="log-mel input")
    w = RecordingWriter.create(tmp_path / "a.h5", family="s2t", model_name="m", model_class="X",
                               sample_ids=["a", "b"], stacks=[StackSpec("cross", 1, 1, 4, 6, lay)], class_names=[],
                               per_sample=[spec], with_meta=True, batch_size=2)
    feats = np.arange(2 * 3 * 4, dtype=np.float32).reshape(2, 3, 4)  # 4 of the 5 frames given
    with w:
        w.write(SampleBatch(start=0, attention={"cross": np.full((2, 1, 1, 4, 6), 1 / 6)}, predictions=np.full(2, -1),
                            logits=np.full((2, 1), np.nan), per_sample={"features": feats},
                            meta=[{"tokens": ["a"]}, {}]))
        w.finish()
    with attnviz.open(tmp_path / "a.h5") as rec:
        assert rec.per_sample_arrays() == ["features"]
        info = rec.per_sample_info("features")
        assert info.shape == (3, 5) and info.axes == ("mel", "frame") and info.dtype == "float16"
        row = rec.per_sample("features", 1)
        assert np.array_equal(row[:, :4], feats[1]) and (row[:, 4] == 0).all()
        assert rec.meta(0) == {"tokens": ["a"]} and rec.meta(1) == {}
    with pytest.raises(Exception, match="per-sample array 'Bad'"):
        RecordingWriter.create(tmp_path / "b.h5", family="s2t", model_name="m", model_class="X", sample_ids=["a"],
                               stacks=[StackSpec("cross", 1, 1, 4, 6, lay)], class_names=[],
                               per_sample=[PerSampleSpec("Bad", (3,))])
    assert not (tmp_path / "b.h5.partial").exists()
