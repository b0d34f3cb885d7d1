from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.helpers import make_recording

GRID = (3, 4)
N_LAYERS, N_HEADS = 2, 3
T = 1 + GRID[0] * GRID[1]


def distinct_maps(sample: int) -> np.ndarray:
    """[layer, head, T, T] where every (sample, layer, head, query) row is different and peaked."""
    rng = np.random.default_rng(1000 + sample)
    x = rng.random((N_LAYERS, N_HEADS, T, T)) ** 6 + 1e-3
    return (x / x.sum(-1, keepdims=True)).astype(np.float32)


def apply_patch(data: dict[str, Any], patch: Any) -> dict[str, Any]:
    """What Dash does in the browser with a returned dash.Patch of the selection store."""
    out = dict(data)
    for op in patch.to_plotly_json()["operations"]:
        assert op["operation"] == "Assign" and len(op["location"]) == 1
        out[op["location"][0]] = op["params"]["value"]
    return out


@pytest.fixture
def rec_path(tmp_path: Path) -> Path:
    return make_recording(tmp_path / "run.h5", n_samples=5, n_layers=N_LAYERS, n_heads=N_HEADS, grid=GRID,
                          maps_fn=distinct_maps, batch_size=2)


@pytest.fixture
def app(rec_path: Path):
    from attnviz.app import create_app

    return create_app([rec_path])
