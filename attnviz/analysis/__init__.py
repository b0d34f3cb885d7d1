"""Pure analyses on numpy arrays (no torch, no Dash, no h5py).

Each module holds one analysis; import it by module, e.g.
``from attnviz.analysis.rollout import attention_rollout``. This package imports nothing eagerly so
that adding a module never slows down ``import attnviz``.
"""

from __future__ import annotations
