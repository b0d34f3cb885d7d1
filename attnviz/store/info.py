"""``attnviz info``: a description of a recording as a dict (for ``--json``) and as text."""

from __future__ import annotations

import os
from typing import Any

from attnviz.store.reader import Recording

__all__ = ["describe", "format_description"]


def describe(path: str | os.PathLike) -> dict[str, Any]:
    """Everything ``attnviz info`` shows, JSON-able."""
    with Recording(path) as rec:
        stacks = {}
        for kind in rec.kinds():
            L, H = rec.stack_shape(kind)
            lay = rec.layout(kind)
            stacks[kind] = {
                "layers": L, "heads": H, "prefix_tokens": list(lay.prefix_names),
                "grid": list(lay.grid) if lay.grid else None,
                "patch_size": list(lay.patch_size) if lay.patch_size else None,
                "image_size": list(lay.image_size) if lay.image_size else None,
            }
        datasets = [{"path": p, "shape": list(s), "dtype": dt, "bytes_on_disk": b} for p, s, dt, b in rec.datasets()]
        labelled = int((rec.labels() >= 0).sum()) if rec.n_samples else 0
        return {
            "path": str(rec.path),
            "format_version": rec.format_version,
            "family": rec.family,
            "model": rec.model_name,
            "model_class": rec.model_class,
            "created": rec.created,
            "complete": rec.complete,
            "samples": rec.n_samples,
            "samples_planned": rec.n_planned,
            "layers": rec.n_layers,
            "heads": rec.n_heads,
            "stacks": stacks,
            "store": rec.store,
            "classes": rec.class_names(),
            "labelled_samples": labelled,
            "accuracy": rec.accuracy,
            "has_predictions": rec.has_predictions,
            "model_output": rec.extraction_params.get("output", "logits"),
            "model_fingerprint": rec.model_fingerprint,
            "attributions": rec.attribution_methods(),
            "head_metrics": rec.head_metrics(),
            "analyses": rec.analyses(),
            "skipped_inputs": [{"input": p, "reason": r} for p, r in rec.skipped()],
            "file_bytes": os.path.getsize(rec.path),
            "datasets": datasets,
        }


def _size(n: int) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024  # type: ignore[assignment]
    return str(n)


def format_description(d: dict[str, Any]) -> str:
    """Human-readable form of :func:`describe`."""
    state = "complete" if d["complete"] else f"INCOMPLETE ({d['samples']} of {d['samples_planned']} samples written; continue with --resume)"
    lines = [
        f"{d['path']}  ({_size(d['file_bytes'])})",
        f"  format     attnviz-recording v{d['format_version']}, {state}",
        f"  family     {d['family']}",
        f"  model      {d['model']}  [{d['model_class']}]",
        f"  created    {d['created']}",
        f"  samples    {d['samples']}" + (f", {d['labelled_samples']} labelled" if d["labelled_samples"] else ", no labels"),
        f"  heads      {d['layers']} layers x {d['heads']} heads",
    ]
    if d["accuracy"] is not None:
        lines.append(f"  accuracy   {d['accuracy']:.1%}")
    fp = d.get("model_fingerprint") or {}
    if fp:
        lines.append(f"  model id   weights sha256 {str(fp.get('weights_sha256', ''))[:16]} ({fp.get('weights_hash', '?')}, "
                     f"{_size(int(fp.get('weights_bytes', 0)))}), config {str(fp.get('config_sha256', ''))[:16]}"
                     + (f", {len(fp.get('processing') or {})} processing file(s)" if fp.get("processing") else ""))
    if not d.get("has_predictions", True) and d["samples"]:
        out = d.get("model_output", "logits")
        if out == "generated":  # s2t, lvlm: the output is text (samples/meta)
            lines.append("  predictions  none: a generative model; its output is the text in samples/meta")
        else:
            how = f"; its output is the pooled embedding ({out})" if out != "logits" else ""
            lines.append(f"  predictions  none: the model has no classification head{how}")
    store = d.get("store", "full")
    if store != "full":
        what = ("query rows only: the prefix rows and sampled query patches of every map (rows, row_positions)"
                if store == "rows" else "no attention maps: per-head summaries only")
        lines.append(f"  stored     --store {store}: {what}")
    for kind, s in d["stacks"].items():
        geo = f", grid {s['grid'][0]}x{s['grid'][1]}" if s["grid"] else ""
        if s["grid"] and s["patch_size"]:
            geo += f" of {s['patch_size'][0]}x{s['patch_size'][1]} px"
        pre = f", prefix tokens {','.join(s['prefix_tokens'])}" if s["prefix_tokens"] else ""
        lines.append(f"  attention  {kind}: {s['layers']}x{s['heads']}{geo}{pre}")
    if d["classes"]:
        lines.append(f"  classes    {', '.join(d['classes'][:12])}" + (" ..." if len(d["classes"]) > 12 else ""))
    lines.append(f"  attributions  {', '.join(d['attributions']) or 'none'}")
    lines.append(f"  head metrics  {', '.join(d['head_metrics']) or 'none'}")
    lines.append(f"  analyses      {', '.join(d['analyses']) or 'none'}")
    if d["skipped_inputs"]:
        lines.append(f"  skipped    {len(d['skipped_inputs'])} input(s):")
        lines += [f"    {s['input']}: {s['reason']}" for s in d["skipped_inputs"][:10]]
    lines.append("  datasets:")
    w = max(len(x["path"]) for x in d["datasets"])
    for x in d["datasets"]:
        shape = "x".join(str(v) for v in x["shape"]) or "scalar"
        lines.append(f"    {x['path']:<{w}}  {shape:>22}  {x['dtype']:<8} {_size(x['bytes_on_disk']):>9}")
    return "\n".join(lines)
