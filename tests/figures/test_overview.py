from __future__ import annotations

import numpy as np

from attnviz.figures import decode_data_uri
from attnviz.figures.overview import (
    CORRECT,
    WRONG,
    class_colour,
    fig_model_card,
    fig_thumbnail_grid,
    hex_rgb,
    tile_mosaic,
)


def _solid(n: int, size: int = 20) -> np.ndarray:
    colours = np.array([[10 * i + 5, 200 - 10 * i, 100] for i in range(n)], np.uint8)
    return np.broadcast_to(colours[:, None, None, :], (n, size, size, 3)).copy()


def test_mosaic_places_tiles_row_major_with_coloured_borders():
    thumbs = _solid(5)
    colours = [CORRECT, WRONG, CORRECT, WRONG, CORRECT]
    m = tile_mosaic(thumbs, colours, cols=3, tile=16, border=2)
    assert m.shape == (32, 48, 3)
    for i in range(5):
        r, c = divmod(i, 3)
        assert tuple(m[r * 16, c * 16]) == hex_rgb(colours[i])          # frame
        assert tuple(m[r * 16 + 8, c * 16 + 8]) == tuple(thumbs[i, 0, 0])  # inside: the thumbnail
    assert (m[16:, 32:] == 255).all()  # the empty 6th slot is white


def test_thumbnail_grid_clicks_map_to_samples_and_image_matches():
    thumbs = _solid(7)
    samples = [3, 10, 11, 12, 20, 21, 40]
    colours = [class_colour(i % 3) for i in range(7)]
    fig = fig_thumbnail_grid(thumbs, samples, colours, cols=4, tile=16, border=2, selected=12,
                             legend=[("a", class_colour(0))])
    image, points = fig.data[0], fig.data[1]
    assert image.type == "image" and image.hoverinfo == "skip"
    assert list(points.customdata) == samples
    # the point of tile i sits at its centre, and the mosaic pixel there is that thumbnail
    pix = decode_data_uri(image.source)
    for i, (x, y) in enumerate(zip(points.x, points.y)):
        assert (x, y) == ((i % 4) * 16 + 8, (i // 4) * 16 + 8)
        assert tuple(pix[int(y), int(x), :3]) == tuple(thumbs[i, 0, 0])
    # the selected sample (index 3 in the page) is outlined
    (shape,) = fig.layout.shapes
    assert (shape.x0, shape.y0) == (3 * 16 - 1, -1)
    assert fig.data[2].name == "a"


def test_model_card_table_holds_the_rows():
    fig = fig_model_card([("model", "vit-tiny"), ("accuracy", "95.0%")])
    assert list(fig.data[0].cells.values[0]) == ["model", "accuracy"]
    assert list(fig.data[0].cells.values[1]) == ["vit-tiny", "95.0%"]
