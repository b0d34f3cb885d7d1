from __future__ import annotations

from pathlib import Path

import pytest

from tests.store._synth import Written, write_s2t, write_vit


@pytest.fixture
def vit(tmp_path: Path) -> Written:
    """A complete 7-sample ViT recording (2 layers x 3 heads, 3x3 grid + CLS, batches of 3)."""
    return write_vit(tmp_path / "vit.h5")


@pytest.fixture
def s2t(tmp_path: Path) -> Written:
    """A complete 5-sample speech-to-text recording with variable lengths in every stack."""
    return write_s2t(tmp_path / "s2t.h5")
