"""attnviz: visual analytics for the attention heads of transformer models.

Importing attnviz must stay light: no torch, no umap, no Dash. The dashboard and the CLI import
what they need lazily.

>>> import attnviz
>>> with attnviz.open("run.h5") as rec:            # doctest: +SKIP
...     a = rec.attention(sample=0, layer=3, head=1)  # (query_pos, key_pos) float32
"""

from __future__ import annotations

from attnviz.errors import AttnvizError, InputError, ModelError, RecordingError
from attnviz.store.reader import Recording, open

__version__ = "0.1.0"

__all__ = [
    "AttnvizError",
    "InputError",
    "ModelError",
    "Recording",
    "RecordingError",
    "open",
    "__version__",
]
