"""``python -m attnviz.analysis.patterns FILE``: compute the atlas with JSON progress lines (the dashboard's button)."""

from __future__ import annotations

from attnviz.analysis.patterns.atlas import compute_patterns
from attnviz.analysis.patterns.params import PatternParams


def main(argv: list[str] | None = None) -> int:
    """``python -m attnviz.analysis.patterns FILE [--max-maps N] [--clusters auto|K|hdbscan] [--device D]``:
    compute the atlas, printing one JSON object per progress step on stdout (``{"stage", "fraction",
    "message"}``), then ``{"done": true, "reused": ..., "n_maps": ..., "n_clusters": ...}``. The dashboard's
    "compute" button runs this in a subprocess (the server itself never imports torch)."""
    import argparse
    import json

    ap = argparse.ArgumentParser(prog="python -m attnviz.analysis.patterns")
    ap.add_argument("file")
    ap.add_argument("--max-maps", type=int, default=PatternParams.max_maps)
    ap.add_argument("--clusters", default="auto")
    ap.add_argument("--device", default="auto")
    args = ap.parse_args(argv)

    def emit(stage: str, fraction: float, message: str) -> None:
        print(json.dumps({"stage": stage, "fraction": round(float(fraction), 4), "message": message}), flush=True)

    method = "hdbscan" if args.clusters.lower() == "hdbscan" else "kmeans"
    try:
        params = PatternParams(max_maps=args.max_maps, method=method,
                               clusters="auto" if method == "hdbscan" else args.clusters)
        atlas = compute_patterns(args.file, params, device=args.device, progress=emit)
    except Exception as e:  # noqa: BLE001 - reported to the page as one line
        print(json.dumps({"error": str(e).splitlines()[0] if str(e) else type(e).__name__}), flush=True)
        return 2
    print(json.dumps({"done": True, "reused": atlas.reused, "n_maps": atlas.n_maps, "n_clusters": atlas.n_clusters}),
          flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
