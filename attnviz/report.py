"""``attnviz report``: the dashboard's views as image files (PNG/SVG) plus an ``index.html``.

The views come from the registry in :mod:`attnviz.app.exports` (one module per dashboard page;
see its docstring for adding one). This module only chooses samples and views, builds the figures
and exports them with kaleido, one Chromium for the whole batch (``kaleido.start_sync_server``),
with explicit width/height (a figure's own layout width/height wins where it sets them).
"""

from __future__ import annotations

import html
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

from attnviz.app.exports import ReportView, ViewResult, load_views
from attnviz.errors import InputError
from attnviz.store.reader import Recording

__all__ = ["parse_samples", "write_report", "collect_figures", "check_browser", "CHROMIUM_HINT"]

CHROMIUM_HINT = ("image export needs Chromium: install it (`apt-get install -y chromium`, or run "
                 "`kaleido_get_chrome`) or point BROWSER_PATH at a Chrome/Chromium binary")


def parse_samples(spec: str | None, n_samples: int, default: int = 3) -> list[int]:
    """``"0,3,10-12"`` -> [0, 3, 10, 11, 12]; ``"all"``; None -> the first ``default``.

    Raises:
        InputError: malformed, or a sample out of range.
    """
    if spec is None:
        return list(range(min(default, n_samples)))
    if spec.strip().lower() == "all":
        return list(range(n_samples))
    out: list[int] = []
    for part in spec.split(","):
        part = part.strip()
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", part)
        if not m:
            raise InputError(f"--samples: cannot read {part!r}; use e.g. 0,3,10-12 or all")
        a, b = int(m.group(1)), int(m.group(2) or m.group(1))
        if b < a:
            raise InputError(f"--samples: empty range {part!r}")
        for s in range(a, b + 1):
            if s >= n_samples:
                raise InputError(f"--samples: sample {s} out of range 0..{n_samples - 1}")
            if s not in out:
                out.append(s)
    return out


@dataclass(frozen=True)
class ReportItem:
    view: ReportView
    sample: int | None
    stem: str       # file name without extension
    label: str      # caption
    figure: Any


def collect_figures(rec: Recording, *, samples: Sequence[int], views: Sequence[str] | None = None) -> list[ReportItem]:
    """Build every figure of the report (no export yet)."""
    available = load_views()
    if views is not None:
        known = {v.name for v in available}
        unknown = [v for v in views if v not in known]
        if unknown:
            raise InputError(f"unknown view(s) {', '.join(unknown)}; available: {', '.join(sorted(known))}")
        available = [v for v in available if v.name in views]
    items: list[ReportItem] = []
    for view in available:
        for sample in (samples if view.per_sample else [None]):
            for suffix, fig in _figures(view.make(rec, sample)):
                parts = [view.name] + ([f"s{sample}"] if sample is not None else []) + ([suffix] if suffix else [])
                label = view.title + (f" — sample {sample} ({rec.sample_ids()[sample]})" if sample is not None else "")
                if suffix:
                    label += f" — {suffix.replace('_', ' ')}"
                items.append(ReportItem(view, sample, "_".join(parts), label, fig))
    return items


def _figures(result: ViewResult) -> Iterable[tuple[str, Any]]:
    if result is None:
        return []
    if isinstance(result, (list, tuple)):
        return [(re.sub(r"[^a-z0-9_]+", "_", s.lower()).strip("_"), f) for s, f in result if f is not None]
    return [("", result)]


def write_report(file: str | os.PathLike, out: str | os.PathLike, *, fmt: str = "png", samples: str | None = None,
                 views: str | Sequence[str] | None = None, width: int = 900, height: int = 600) -> Path:
    """Write every view of ``file`` as ``fmt`` images into ``out`` plus ``out/index.html``.

    Args:
        file: a recording.
        out: output folder (created).
        fmt: "png" or "svg".
        samples: per-sample views' samples, e.g. "0,3,10-12" (default: the first 3).
        views: view names to export (default: all registered).
        width, height: image size in pixels where a figure does not set its own.

    Returns:
        The path of ``index.html``.

    Raises:
        InputError: bad options, or no Chromium for kaleido (one line saying how to install it).
        RecordingError: the file cannot be opened.
    """
    fmt = fmt.lower()
    if fmt not in ("png", "svg"):
        raise InputError(f"--format must be png or svg, not {fmt!r}")
    if width < 10 or height < 10:
        raise InputError("--width and --height must be at least 10 pixels")
    if isinstance(views, str):
        views = [v.strip() for v in views.split(",") if v.strip()]
    out = Path(out)
    from attnviz.figures import use_house_template

    use_house_template()
    with Recording(file) as rec:
        if rec.n_samples == 0:
            raise InputError(f"{file}: no samples written yet; nothing to report")
        chosen = parse_samples(samples, rec.n_samples)
        items = collect_figures(rec, samples=chosen, views=views)
        title = f"{rec.model_name} — {Path(file).name}"
        summary = (f"{rec.family}, {rec.n_layers} layers × {rec.n_heads} heads, {rec.n_samples} samples"
                   + ("" if rec.complete else f" (incomplete: {rec.n_samples} of {rec.n_planned})"))
    out.mkdir(parents=True, exist_ok=True)
    written = _export(items, out, fmt, width, height)
    index = out / "index.html"
    index.write_text(_index_html(title, summary, written), encoding="utf-8")
    return index


def _export(items: list[ReportItem], out: Path, fmt: str, width: int, height: int) -> list[tuple[ReportItem, str, int, int]]:
    import warnings

    import kaleido
    import plotly.io as pio

    warnings.filterwarnings("ignore", message="The kopts argument is ignored")
    written: list[tuple[ReportItem, str, int, int]] = []
    check_browser()
    try:
        kaleido.start_sync_server(silence_warnings=True)
    except Exception as e:  # noqa: BLE001 - kaleido/choreographer raise several types for a missing browser
        raise _browser_error(e) from None
    try:
        for it in items:
            w = int(it.figure.layout.width or width)
            h = int(it.figure.layout.height or height)
            name = f"{it.stem}.{fmt}"
            try:
                pio.write_image(it.figure, out / name, format=fmt, width=w, height=h)
            except Exception as e:  # noqa: BLE001
                raise _browser_error(e) from None
            written.append((it, name, w, h))
    finally:
        try:
            kaleido.stop_sync_server(silence_warnings=True)
        except Exception:  # noqa: BLE001 - stopping a server that failed to start
            pass
    return written


def check_browser() -> None:
    """Raise :class:`InputError` with :data:`CHROMIUM_HINT` when kaleido finds no Chrome/Chromium.

    Checked before the sync server starts: that server fails in a background thread and would
    leave the caller waiting.
    """
    import kaleido
    from choreographer.errors import ChromeNotFoundError

    try:
        kaleido.Kaleido()  # resolves the browser path; starts nothing
    except ChromeNotFoundError:
        raise InputError(CHROMIUM_HINT) from None


def _browser_error(e: Exception) -> Exception:
    text = f"{type(e).__name__}: {e}"
    if "chrom" in text.lower() or "browser" in text.lower():
        return InputError(CHROMIUM_HINT)
    return e


def _index_html(title: str, summary: str, written: list[tuple[ReportItem, str, int, int]]) -> str:
    rows = []
    for it, name, w, h in written:
        rows.append(f'<figure><a href="{html.escape(name)}"><img src="{html.escape(name)}" width="{w // 2}" '
                    f'alt="{html.escape(it.label)}"></a><figcaption>{html.escape(it.label)}</figcaption></figure>')
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>
<style>body{{font-family:sans-serif;margin:2em;color:#222}} figure{{display:inline-block;margin:1em;vertical-align:top}}
figcaption{{font-size:0.9em;max-width:460px}} img{{border:1px solid #ddd}}</style></head>
<body><h1>{html.escape(title)}</h1><p>{html.escape(summary)}</p>
{chr(10).join(rows)}
</body></html>
"""
