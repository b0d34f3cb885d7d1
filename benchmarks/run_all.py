"""One entry point for the performance figures of docs/performance.md: runs the benchmarks side by side in one
sitting and prints one table of ratios against their targets (run by hand; never a test).

Each row comes from the benchmark script that owns it, run as a subprocess with settings small enough for a
2-core machine (``--quick`` smaller still), so every number can be reproduced alone with the command the table
names:

=================================  =====================================  ===========
row                                 script                                  target
=================================  =====================================  ===========
extraction / bare eager forward    ``extract_vit.py``                      <= 1.25
naive per-image script / attnviz   ``extract_vit.py``                      >= 3
batched / looped head ablation     ``importance.py``                       >= 4
dashboard callback p95             ``dashboard.py`` on a >= 2 GB file      < 100 ms
dashboard RSS growth               ``dashboard.py``                        flat
spatial analysis                   ``spatial.py``                          streams
pattern atlas                      ``patterns.py``                         <= 180 s
torchrun 2 ranks / 1 process       this file (``attnviz extract``)         < 1
=================================  =====================================  ===========

Wall time on a shared machine grows with other jobs' load; where a script reports CPU seconds the table shows
both. The machine (CPU count, load average, torch threads, GPU) is printed with the table.

    python benchmarks/run_all.py                  # everything (about 25 minutes on 2 cores; a 2 GB file in /tmp)
    python benchmarks/run_all.py --quick          # smaller sizes, a few minutes (the dashboard on 0.5 GB)
    python benchmarks/run_all.py --only extract,torchrun --json results.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
ROWS = ("extract", "importance", "dashboard", "spatial", "patterns", "torchrun")


def _run(cmd: list[str], timeout: float) -> str:
    print("$ " + " ".join(str(c) for c in cmd), flush=True)
    t = time.perf_counter()
    proc = subprocess.run([str(c) for c in cmd], cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[1]} failed (exit {proc.returncode}): {proc.stderr.strip()[-800:]}")
    print(f"  ({time.perf_counter() - t:.0f} s)", flush=True)
    return proc.stdout


def _find(pattern: str, text: str, what: str) -> re.Match:
    m = re.search(pattern, text)
    if m is None:
        raise RuntimeError(f"cannot read {what} from the benchmark's output:\n{text[-1500:]}")
    return m


def bench_extract(quick: bool, tmp: Path) -> list[dict]:
    out = tmp / "extract.json"
    n = 16 if quick else 48
    _run([sys.executable, HERE / "extract_vit.py", "--images", n, "--repeat", 2, "--json", out], 3600)
    r = json.loads(out.read_text())
    shape = f"ViT {r['layers']}x{r['heads']} hidden {r['hidden']}, 224 px, {n} images"
    rows = [dict(row="extraction / bare eager forward", value=r["b_wall"] / r["a_wall"],
                 cpu=r["b_cpu"] / r["a_cpu"], target="<= 1.25", ok=r["b_wall"] / r["a_wall"] <= 1.25, detail=shape,
                 command=f"python benchmarks/extract_vit.py --images {n}")]
    if r.get("c_wall"):
        rows.append(dict(row="naive per-image script / attnviz", value=r["c_wall"] / r["b_wall"],
                         cpu=r["c_cpu"] / r["b_cpu"], target=">= 3", ok=r["c_wall"] / r["b_wall"] >= 3, detail=shape,
                         command=f"python benchmarks/extract_vit.py --images {n}"))
    return rows


def bench_importance(quick: bool, tmp: Path) -> list[dict]:
    text = _run([sys.executable, HERE / "importance.py", "--repeat", 2 if quick else 3], 3600)
    speed = float(_find(r"speed-up\s*:\s*([\d.]+)x", text, "the speed-up").group(1))
    dev = _find(r"device: ([^;]+);", text, "the device").group(1)
    return [dict(row="batched / looped head ablation", value=speed, cpu=None, target=">= 4", ok=speed >= 4,
                 detail=f"demo-sized ViT 6x4 heads, {dev}", command="python benchmarks/importance.py")]


def bench_dashboard(quick: bool, tmp: Path) -> list[dict]:
    size = 0.5 if quick else 2.0
    path = Path(tempfile.gettempdir()) / "attnviz-bench" / f"dashboard_{size:g}gb.h5"
    path.parent.mkdir(parents=True, exist_ok=True)
    text = _run([sys.executable, HERE / "dashboard.py", "--build", path, "--size-gb", size,
                 "--switches", 40 if quick else 100], 7200)
    p95 = {m.group(1).strip(): float(m.group(2)) for m in
           re.finditer(r"^(\w[\w ()-]*?)\s+[\d.]+\s+([\d.]+)\s+[\d.]+\s+[\d.]+\s+[\d.]+\s*$", text, re.M)}
    if not p95:
        raise RuntimeError(f"no switch timings in the dashboard benchmark's output:\n{text[-1500:]}")
    worst_name, worst = max(p95.items(), key=lambda kv: kv[1])
    rss = _find(r"RSS before (\d+) MB, after (\d+) MB \(\+(-?\d+) MB\) on a ([\d.]+) GB file", text, "the RSS")
    gb = float(rss.group(4))
    return [dict(row="dashboard callback p95 (worst switch)", value=worst, cpu=None, target="< 100 ms",
                 ok=worst < 100, unit="ms", detail=f"{worst_name} on a {gb:.2f} GB file; "
                 + ", ".join(f"{k} {v:.0f}" for k, v in p95.items()),
                 command=f"python benchmarks/dashboard.py --build {path} --size-gb {size:g}"),
            dict(row="dashboard RSS growth", value=float(rss.group(3)), cpu=None, target="flat", unit="MB",
                 ok=float(rss.group(3)) < 0.05 * gb * 1024, detail=f"{rss.group(1)} -> {rss.group(2)} MB on {gb:.2f} GB",
                 command=f"python benchmarks/dashboard.py --file {path}")]


def bench_spatial(quick: bool, tmp: Path) -> list[dict]:
    n = 200 if quick else 1000
    text = _run([sys.executable, HERE / "spatial.py", "--images", n, "--dir", tmp], 7200)
    res = json.loads(text.strip().splitlines()[-1])
    big = max(res["runs"], key=lambda r: r["images"])
    small = min(res["runs"], key=lambda r: r["images"])
    return [dict(row="spatial analysis (s per 1000 images)", value=1000 * big["seconds"] / big["images"], cpu=None,
                 target="streams", unit="s", ok=big["peak_rss_mb"] < small["peak_rss_mb"] * 1.5 + 64,
                 detail=f"{big['images']} images of 12x12 heads, 197 tokens: peak RSS {big['peak_rss_mb']:.0f} MB "
                        f"({small['images']} images: {small['peak_rss_mb']:.0f} MB)",
                 command=f"python benchmarks/spatial.py --images {n}")]


def bench_patterns(quick: bool, tmp: Path) -> list[dict]:
    maps = 10_000 if quick else 50_000
    text = _run([sys.executable, HERE / "patterns.py", "--maps", maps, "--dir", tmp], 7200)
    res = json.loads(text.strip().splitlines()[-1])["result"]
    s = res["summary"]
    total, cpu, peak = float(s["seconds"]["total"]), float(s["cpu_seconds"]["total"]), float(res["peak_rss_mib"])
    return [dict(row=f"pattern atlas ({maps} maps)", value=total, cpu=None, target="<= 180 s", unit="s",
                 ok=total <= 180 if maps >= 50_000 else None,
                 detail=f"12x12 heads, 27x27 centred maps, {s['n_clusters']} clusters; cpu {cpu:.0f} s, "
                        f"peak RSS {peak:.0f} MiB",
                 command=f"python benchmarks/patterns.py --maps {maps}")]


def bench_torchrun(quick: bool, tmp: Path) -> list[dict]:
    """``attnviz extract`` on the same images as one process (all cores) and as 2 torchrun ranks (half the
    cores each), rank 0 merging the shards; the ratio is the wall time of the second over the first."""
    sys.path.insert(0, str(HERE))
    from extract_vit import build  # the same random ViT and images as the extraction row

    n = 24 if quick else 64
    args = argparse.Namespace(hidden=384, layers=12, heads=6, image=224, patch=16, images=n)
    model_dir, img_dir = build(tmp / "torchrun", args)
    cores = os.cpu_count() or 2
    base = ["--model", str(model_dir), "--input", str(img_dir), "--attributions", "none", "--batch-size", "8",
            "--device", "cpu", "--no-progress"]
    env = dict(os.environ, OMP_NUM_THREADS=str(cores))
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "attnviz", "extract", *base, "--out", str(tmp / "one.h5")], cwd=ROOT, env=env,
                   check=True, capture_output=True)
    one = time.perf_counter() - t
    env = dict(os.environ, OMP_NUM_THREADS=str(max(1, cores // 2)))
    t = time.perf_counter()
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "attnviz", "extract",
                    *base, "--out", str(tmp / "two.h5")], cwd=ROOT, env=env, check=True, capture_output=True)
    two = time.perf_counter() - t
    return [dict(row="torchrun 2 ranks / 1 process", value=two / one, cpu=None, target="< 1 (more cores)",
                 ok=None if cores < 4 else two / one < 1,
                 detail=f"{n} images, ViT-S/16 shape; {one:.1f} s vs {two:.1f} s on {cores} cores "
                        "(2 ranks share the same cores here: the ratio shows the sharding's overhead)",
                 command="python benchmarks/run_all.py --only torchrun")]


BENCHES = {"extract": bench_extract, "importance": bench_importance, "dashboard": bench_dashboard,
           "spatial": bench_spatial, "patterns": bench_patterns, "torchrun": bench_torchrun}


def machine() -> str:
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average "
            f"{os.getloadavg()[0]:.1f}, torch {torch.__version__} ({torch.get_num_threads()} threads), {gpu}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", default=",".join(ROWS), help=f"comma-separated subset of {', '.join(ROWS)}")
    ap.add_argument("--quick", action="store_true", help="smaller sizes (minutes, not half an hour)")
    ap.add_argument("--json", type=Path, default=None, help="also write the rows as JSON here")
    args = ap.parse_args()
    chosen = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in chosen if s not in BENCHES]
    if unknown:
        ap.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(ROWS)}")
    before = machine()
    rows: list[dict] = []
    with tempfile.TemporaryDirectory(prefix="attnviz-bench-") as d:
        for name in chosen:
            try:
                rows += BENCHES[name](args.quick, Path(d))
            except Exception as e:  # noqa: BLE001 - one broken benchmark must not hide the others
                rows.append(dict(row=name, value=float("nan"), cpu=None, target="", ok=False,
                                 detail=f"failed: {str(e).splitlines()[0][:200]}", command=""))
    print(f"\nmachine: {before}\nafter:   {machine()}\n")
    print(f"{'row':42s} {'measured':>12s} {'cpu':>6s} {'target':>18s}  met  detail")
    for r in rows:
        unit = r.get("unit", "x")
        val = f"{r['value']:.2f}{'' if unit == 'x' else ' '}{unit}" if r["value"] == r["value"] else "-"
        cpu = f"{r['cpu']:.2f}" if r.get("cpu") else ""
        met = {True: "yes", False: "NO", None: "n/a"}[r["ok"]]
        print(f"{r['row']:42s} {val:>12s} {cpu:>6s} {r['target']:>18s}  {met:>3s}  {r['detail']}")
    if args.json:
        args.json.write_text(json.dumps({"machine": before, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
