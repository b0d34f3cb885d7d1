"""Figures of the Vision-language page, on their trace data."""

from __future__ import annotations

import numpy as np

from attnviz.figures.vlm import fig_image_attention, fig_sink_frequency, fig_token_ratios, image_heat, sink_cells


def test_image_heat_and_sink_cells_follow_the_image_tokens() -> None:
    row = np.arange(20, dtype=float)  # keys: 2 text, [2, 19) image (CLS kept: offset 1 -> 16 patches + 1), 1 text
    heat = image_heat(row, (2, 19), (4, 4), offset=1)
    assert heat[0, 0] == 3 and heat[3, 3] == 18 and heat[1, 0] == 7
    sinks = np.zeros(17, bool)
    sinks[[0, 1, 16]] = True  # CLS (not a patch), patch (0, 0), patch (3, 3)
    assert sink_cells(sinks, (4, 4), offset=1) == [(0, 0), (3, 3)]


def test_image_attention_marks_each_sink_once() -> None:
    img = np.zeros((32, 32, 3), np.uint8)
    fig = fig_image_attention(img, np.eye(4), patch_size=(8, 8), sinks=[(0, 1), (2, 3)], title="t")
    marks = [s for s in fig.layout.shapes if s.name == "sink"]
    assert [(m.x0, m.y0) for m in marks] == [(9, 1), (25, 17)]
    assert np.array_equal(fig.data[1].z, np.eye(4))


def test_token_ratios_show_special_tokens_literally() -> None:
    fig = fig_token_ratios(["red", "</s>"], np.array([0.25, 0.5]), selected=1, vhd=np.array([1.0, 2.0]))
    assert fig.layout.xaxis.ticktext == ("red", "&lt;/s&gt;")
    assert list(fig.data[0].y) == [0.25, 0.5] and fig.data[0].marker.color[1] == "#e4572e"
    assert list(fig.data[1].y) == [1.0, 2.0] and fig.data[1].yaxis == "y2"


def test_sink_frequency_is_one_tile_per_layer() -> None:
    freq = np.zeros((3, 16))
    freq[2, 5] = 0.5  # layer 2, patch (1, 1)
    fig = fig_sink_frequency(freq, (4, 4), tau=20)
    z = np.asarray(fig.data[0].z, dtype=float)
    assert z.shape == (9, 9)  # 2 x 2 tiles of 4x4 with one gap row/column
    assert z[5 + 1, 1] == 0.5 and list(fig.data[1].text) == ["layer 0", "layer 1", "layer 2"]
    assert "phi > 20" in fig.layout.title.subtitle.text
