"""The ``attnviz`` command line (typer).

Each command is a thin wrapper: parse options, call the library, print. Errors that are the user's
(:class:`~attnviz.errors.AttnvizError`) become one line ``error: ...`` with exit code 2 and no
traceback. Heavy imports (torch, transformers, Dash) happen inside the commands that need them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from attnviz.errors import AttnvizError, InputError

app = typer.Typer(
    name="attnviz",
    help="Visual analytics for the attention heads of transformer models.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)


@app.callback()
def _root() -> None:
    """Visual analytics for the attention heads of transformer models."""


def fail(message: str) -> None:
    """Print ``error: message`` to stderr and exit with code 2."""
    typer.echo(f"error: {message}", err=True)
    raise typer.Exit(code=2)


@app.command()
def extract(
    model: str = typer.Option(..., "--model", help="A model folder made by save_pretrained, or a hub id already "
                              "in the local Hugging Face cache (attnviz never downloads)."),
    input_path: Path = typer.Option(..., "--input", help="An image, a folder of images (recursive; class-named "
                               "subfolders give labels), or a .jsonl/.csv manifest (image, label, mask); for a "
                               "vision-language model a manifest of questions (image, prompt, answer, mask); "
                               "for a speech model an audio file (wav, flac, ogg), a folder of them, or a "
                               "manifest (audio, text, words with start/end seconds)."),
    out: Path = typer.Option(..., "--out", help="The recording to write (.h5)."),
    family: Optional[str] = typer.Option(None, "--family", help="Expected model family (vit, lvlm, s2t); default: "
                                         "detected from the model's config."),
    device: str = typer.Option("auto", "--device", help="auto (cuda when available), cpu or cuda."),
    dtype: str = typer.Option("float32", "--dtype", help="Forward precision on the GPU: float32, float16 or "
                              "bfloat16 (autocast; maps are stored as float16 either way)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Images per forward pass (and per resumable unit)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Record at most N images (the first in order)."),
    attributions: str = typer.Option("default", "--attributions", help="Comma list of attribution methods, "
                                     "'default' (rollout,saliency), 'all', or 'none' for attention only. Cost on a "
                                     "ViT-S/16 on the CPU, as a multiple of attention only: rollout 1.4x, saliency "
                                     "3x, integrated_gradients 35x (32 steps), occlusion 74x (one forward per "
                                     "patch), all 100x (docs/attributions.md)."),
    target: str = typer.Option("auto", "--target", help="What attributions explain: auto (a classifier's predicted "
                               "class, a backbone's embedding norm), predicted, label (classifiers), embedding_norm "
                               "or embedding_similarity (backbones without a classification head)."),
    image_size: Optional[str] = typer.Option(None, "--image-size", help="Record at another input size than the "
                                             "model's, e.g. 448 or 448x336 (height x width, multiples of the patch "
                                             "size); position embeddings are interpolated."),
    store_qk: float = typer.Option(0.0, "--store-qk", help="Also store every head's query and key vectors for the "
                                   "joint query-key view (AttentionViz), at this fraction of each image's tokens "
                                   "(CLS always): 1 = all (about as many bytes again as the maps), 0.25 = a quarter."),
    compression: str = typer.Option("auto", "--compression", help="HDF5 compression: auto (lzf on a GPU run, "
                                    "none on the CPU, where lzf costs CPU time and attention maps hardly "
                                    "compress), lzf, gzip (smaller, slower) or none."),
    store: str = typer.Option("full", "--store", help="What to keep of the attention maps (image models): full "
                              "(every map), rows (every head's rows of the prefix tokens and of --store-rows "
                              "query patches per image, drawn at random, seeded by the image's index) or summary "
                              "(no maps: per-head statistics, predictions, thumbnails, attributions only). "
                              "Views that need whole maps say so."),
    store_rows: int = typer.Option(16, "--store-rows", help="--store rows: query patches per image whose rows are "
                                   "kept besides the prefix rows (CLS, registers); all of them when fewer."),
    dry_run: bool = typer.Option(False, "--dry-run", help="Check everything, time one batch and print the "
                                 "estimated file size (uncompressed and with --compression) and time; write nothing."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run (<out>.partial) with the "
                                "same options."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar on stderr."),
    importance: bool = typer.Option(False, "--importance", help="Then measure pruning-based head importance on "
                                    "the same inputs (as `attnviz importance`, zero ablation)."),
    max_new_tokens: Optional[int] = typer.Option(None, "--max-new-tokens", help="Generative models: tokens "
                                                 "generated at most (vision-language default 16; speech "
                                                 "default Whisper's budget, half the decoder context per "
                                                 "full window, scaled to the longest clip)."),
    answer_rows_only: bool = typer.Option(False, "--answer-rows-only", help="Vision-language models: record only "
                                          "the language model's attention rows of the answer's generation steps, "
                                          "not every prompt position (a fraction of the bytes)."),
    vhd: Optional[bool] = typer.Option(None, "--vhd/--no-vhd", help="Vision-language models: measure every head's "
                                       "vision-aware head divergence with a second, image-free forward (default on)."),
    vhd_top_k: Optional[int] = typer.Option(None, "--vhd-top-k", help="Vision-language models: k of T-VHD, the sum "
                                            "over layers of each layer's k largest VHDs (default 2)."),
    sinks: Optional[bool] = typer.Option(None, "--sinks/--no-sinks", help="Vision-language models: record the "
                                         "visual-sink statistic phi of every token and layer (default on)."),
    sink_tau: Optional[float] = typer.Option(None, "--sink-tau", help="Vision-language models: tau of the visual "
                                             "sink tokens and massive dimensions, |x_d / rms(x)| > tau (default 20)."),
    sink_calibration: Optional[int] = typer.Option(None, "--sink-calibration", help="Vision-language models: "
                                                   "questions whose hidden states decide the massive dimensions "
                                                   "(default the first 64; 0 = all)."),
    reinforce: Optional[float] = typer.Option(None, "--reinforce", help="Vision-language models: also answer "
                                              "with the heads whose VHD is above their layer's median scaled by "
                                              "ALPHA (VHR), storing both answers."),
    beam: Optional[int] = typer.Option(None, "--beam", help="Speech: beams of the decoding search (default 1: greedy)."),
    language: Optional[str] = typer.Option(None, "--language", help="Speech, multilingual checkpoints: the language "
                                           "of the prompt (e.g. en, german); default: detected."),
    task: Optional[str] = typer.Option(None, "--task", help="Speech, multilingual checkpoints: transcribe or translate."),
    stacks: Optional[str] = typer.Option(None, "--stacks", help="Speech: attention kinds to record, e.g. "
                                         "cross,decoder_self (default: cross,self,decoder_self; cross always)."),
    n_masks: Optional[int] = typer.Option(None, "--n-masks", help="Speech: masks per clip of the perturbation "
                                          "saliency (default 128)."),
    mask_batch: Optional[int] = typer.Option(None, "--mask-batch", help="Speech: masked copies per forward pass "
                                             "(default 16)."),
    gradient_method: Optional[str] = typer.Option(None, "--gradient-method", help="Speech: the gradient saliency: "
                                                  "saliency (default), input_x_gradient or integrated_gradients."),
    deletion_steps: Optional[int] = typer.Option(None, "--deletion-steps", help="Speech: deletion curves with this "
                                                 "many steps (fractions 0, 1/N, ..., 1 of the frames removed; "
                                                 "default 0 = none)."),
    alignment_heads: Optional[str] = typer.Option(None, "--alignment-heads", help="Speech: decoder layer:head pairs "
                                                  "that time the words (DTW), e.g. 1:0,1:2 (default: the model's "
                                                  "alignment_heads, else the best heads by CA-vs-saliency)."),
) -> None:
    """Record every head's attention map (plus logits, thumbnails, attributions) into one HDF5 file.

    --store rows|summary keeps less of the maps (image models); --dry-run estimates size and time only."""
    from extractor.pipeline import ExtractOptions, extract as run_extract, parse_attributions, parse_image_size

    # the family's own options, only those given (a family refuses options it does not take)
    given = dict(max_new_tokens=max_new_tokens, answer_rows_only=answer_rows_only or None, vhd=vhd,
                 vhd_top_k=vhd_top_k, sinks=sinks, sink_tau=sink_tau, sink_calibration=sink_calibration,
                 reinforce=reinforce, beam=beam, language=language, task=task, stacks=stacks, n_masks=n_masks,
                 mask_batch=mask_batch, gradient_method=gradient_method, deletion_steps=deletion_steps,
                 alignment_heads=alignment_heads)
    family_options = {k: v for k, v in given.items() if v is not None}
    if importance:  # refused before a long extraction, not after it
        from extractor.adapters import detect, get_adapter, load_config, resolve_model

        arch = detect(load_config(resolve_model(model)))
        if get_adapter(arch.family).input_kind != "image":
            raise InputError(f"--importance (head importance by pruning) is measured for image models; a {arch.family} "
                             "model's heads are measured by `attnviz analyze` (see the family's docs)")
    opts = ExtractOptions(model=model, input=str(input_path), out=str(out), family=family, device=device, dtype=dtype,
                          batch_size=batch_size, limit=limit, attributions=parse_attributions(attributions),
                          target=target, image_size=parse_image_size(image_size), store_qk=store_qk,
                          family_options=family_options, compression=compression, store=store,
                          store_rows=store_rows, dry_run=dry_run, overwrite=overwrite, resume=resume,
                          progress=progress)
    result = run_extract(opts)
    if dry_run:
        for line in result.lines():
            typer.echo(line)
        if importance:
            typer.echo("dry run: --importance not estimated (it runs after the extraction)")
        return
    imp = None
    if importance:
        from extractor.importance import ImportanceOptions, run_importance

        imp = run_importance(result.adapter, str(input_path), result.path, ImportanceOptions(progress=progress),
                             batch_size=batch_size, limit=limit, force=True)
    acc = "" if result.accuracy is None else f", accuracy {result.accuracy:.1%}"
    noun = result.adapter.input_noun if result.adapter is not None else "image"
    typer.echo(f"wrote {result.path}: {result.n_samples} {noun}s{acc}; {result.n_recorded} recorded in "
               f"{result.seconds:.1f} s ({result.rate})"
               + (f"; {len(result.skipped)} input(s) skipped" if result.skipped else ""))
    if imp is not None:
        _echo_importance(result.path, imp)


@app.command()
def importance(
    model: str = typer.Option(..., "--model", help="The model the recording was made with (folder or cached hub id)."),
    input_path: Path = typer.Option(..., "--input", help="Images to measure on: an image, a folder or a manifest "
                                    "(labels as for extract; without labels the model's predictions are the targets)."),
    into: Path = typer.Option(..., "--into", help="A complete recording of this model; results are added to it."),
    ablation: str = typer.Option("zero", "--ablation", help="zero: a head's output is set to 0; mean: to its mean "
                                 "output over the inputs."),
    family: Optional[str] = typer.Option(None, "--family", help="Expected model family (vit)."),
    device: str = typer.Option("auto", "--device", help="auto (cuda when available), cpu or cuda."),
    dtype: str = typer.Option("float32", "--dtype", help="Forward precision on the GPU (float32, float16, bfloat16)."),
    batch_size: int = typer.Option(8, "--batch-size", help="Images per batch (each forward replicates it "
                                   "once per ablation it evaluates)."),
    limit: Optional[int] = typer.Option(None, "--limit", help="Use the first N inputs."),
    seeds: int = typer.Option(5, "--seeds", help="Random pruning orders for the baseline."),
    max_rows: Optional[int] = typer.Option(None, "--max-rows", help="Rows (ablations x images) per forward "
                                           "(default: 64 on the CPU, 2048 on a GPU); lower it if memory runs out."),
    force: bool = typer.Option(False, "--force", help="Recompute even if the stored result has the same parameters."),
    progress: bool = typer.Option(True, "--progress/--no-progress", help="Show a progress bar on stderr."),
) -> None:
    """Pruning-based head importance (ablation, gradient, partial and iterative pruning) into a recording."""
    from extractor.adapters import load_model
    from extractor.importance import ImportanceOptions, run_importance

    opts = ImportanceOptions(ablation=ablation, random_seeds=seeds, max_rows=max_rows, progress=progress)
    if not into.exists():
        raise InputError(f"{into}: no such recording; make it first with `attnviz extract`")
    adapter = load_model(model, family=family, device=device, dtype=dtype)
    result = run_importance(adapter, str(input_path), into, opts, batch_size=batch_size, limit=limit, force=force)
    if result is None:
        typer.echo(f"{into}: head importance is up to date (same parameters; --force recomputes)")
        return
    _echo_importance(into, result)


def _echo_importance(path: Path, result) -> None:  # result: extractor.importance.ImportanceResult
    from attnviz.analysis.importance import accuracy_name

    c = result.curves
    best = max(c.auc, key=c.auc.get)
    typer.echo(f"{path}: head importance of {c.n_samples} input(s), targets = {c.target_source}s, {c.ablation} "
               f"ablation; base {accuracy_name(c.target_source)} {c.base_accuracy:.1%}; best pruning AUC {best} "
               f"{c.auc[best]:.3f} (random {c.random.auc_mean:.3f} +- {c.random.auc_std:.3f})")


@app.command()
def info(
    file: Path = typer.Argument(..., help="A recording (.h5)."),
    as_json: bool = typer.Option(False, "--json", help="Print machine-readable JSON."),
) -> None:
    """Describe a recording: format, model, samples, heads, datasets and their size on disk."""
    from attnviz.store.info import describe, format_description

    d = describe(file)
    typer.echo(json.dumps(d, indent=2) if as_json else format_description(d))


@app.command()
def analyze(
    file: Path = typer.Argument(..., help="A complete recording (.h5); results are added to it."),
    max_samples: Optional[int] = typer.Option(None, "--max-samples", min=1,
                                              help="Head statistics from the first N samples only."),
    spatial: bool = typer.Option(True, "--spatial/--no-spatial",
                                 help="Spatial attention profiles over all samples (cached; reused when unchanged)."),
    patterns: bool = typer.Option(False, "--patterns", help="Pattern atlas: autoencoder + UMAP + clustering of "
                                  "query-centred maps (cached; reused when unchanged). See docs/patterns.md."),
    max_maps: int = typer.Option(50_000, "--max-maps", min=20, help="Patterns: maps in the stratified sample."),
    latent: int = typer.Option(16, "--latent", min=1, help="Patterns: size of the autoencoder's code."),
    clusters: str = typer.Option("auto", "--clusters", help="Patterns: auto (K by silhouette), a number K, or hdbscan."),
    device: str = typer.Option("auto", "--device", help="Patterns: where the autoencoder trains: auto, cpu, cuda."),
    absolute_maps: bool = typer.Option(False, "--absolute-maps", help="Patterns: absolute maps, not query-centred."),
    qk: bool = typer.Option(False, "--qk", help="Joint query-key embedding of every head (AttentionViz; needs a "
                            "recording made with --store-qk). See docs/qk.md."),
    qk_method: str = typer.Option("umap", "--qk-method", help="Query-key: umap (a few seconds per head), tsne "
                                  "(slower) or pca (instant)."),
    qk_points: int = typer.Option(1000, "--qk-points", min=4, help="Query-key: tokens per head (each gives a "
                                  "query and a key point)."),
    sink_tau: Optional[float] = typer.Option(None, "--sink-tau", help="Vision-language: tau of the visual sink "
                                             "tokens (default: the one the recording was made with)."),
    centric_rho: float = typer.Option(0.5, "--centric-rho", help="Vision-language: visual non-sink ratio an "
                                      "image-centric head needs (Kang et al. 2025)."),
    alignment_heads: Optional[str] = typer.Option(None, "--alignment-heads", help="Speech: decoder layer:head pairs "
                                                  "whose cross-attention times the words by DTW, e.g. 1:0,1:2 "
                                                  "(default: as recorded, the model's, else the best by "
                                                  "CA-vs-saliency). See docs/speech.md."),
) -> None:
    """Compute derived per-head results and store them in the recording.

    Always: head statistics (entropy, confidence, CLS attention) and, with object masks, localization scores
    (mask energy, pointing game); for vision-language recordings image attention ratio, VHD, visual sinks and
    image-centric heads (docs/vlm.md); for speech recordings the cross-attention vs saliency comparison, WER and
    word timestamps by DTW (docs/speech.md). Further analyses are options.
    """
    # Extending: add an option above (e.g. `--spatial`) and one step below; import lazily.
    from attnviz.analysis.head_stats import compute_and_store

    stats = compute_and_store(file, max_samples=max_samples)
    import attnviz

    with attnviz.open(file) as rec:
        store = rec.store
    how = "" if store == "full" else f" (from the per-sample statistics kept by --store {store})"
    typer.echo(f"{file}: head statistics {', '.join(stats.as_dict())} from {stats.n_samples} sample(s){how}")
    if spatial:
        from attnviz.analysis.spatial import analyze_step

        for line in analyze_step(file):
            typer.echo(f"{file}: {line}")
    from attnviz.analysis.localization import analyze_step as localization_step

    for line in localization_step(file):
        typer.echo(f"{file}: {line}")
    from attnviz.analysis.lvlm import analyze_step as lvlm_step

    for line in lvlm_step(file, tau=sink_tau, rho=centric_rho):
        typer.echo(f"{file}: {line}")
    from attnviz.analysis.crossattn import analyze_step as speech_step

    for line in speech_step(file, alignment_heads=alignment_heads):
        typer.echo(f"{file}: {line}")
    if patterns:
        from attnviz.analysis.patterns import analyze_step as patterns_step

        for line in patterns_step(file, max_maps=max_maps, latent=latent, clusters=clusters, device=device,
                                  absolute=absolute_maps):
            typer.echo(f"{file}: {line}")
    if qk:
        from attnviz.analysis.qk import analyze_step as qk_step

        for line in qk_step(file, method=qk_method, max_points=qk_points):
            typer.echo(f"{file}: {line}")


@app.command()
def merge(
    out: Path = typer.Argument(..., help="The merged recording to write (.h5)."),
    shards: list[Path] = typer.Argument(..., help="The shard recordings (e.g. run.shard*.h5 from a torchrun extraction)."),
    copy: bool = typer.Option(False, "--copy", help="Copy the data into the merged file (the shards can then be "
                              "deleted) instead of virtual datasets that read the shards in place."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing output file."),
) -> None:
    """Join the shards of a distributed (torchrun) extraction into one recording."""
    from attnviz.store.merge import merge_shards

    path = merge_shards(out, shards, copy=copy, overwrite=overwrite)
    import attnviz

    with attnviz.open(path) as rec:
        typer.echo(f"wrote {path}: {rec.n_samples} samples from {len(shards)} shard(s) "
                   f"({'copied' if copy else 'virtual datasets over the shards, which must stay beside it'})")


@app.command()
def serve(
    files: Optional[list[Path]] = typer.Argument(None, help="Recordings or folders of them (default: sample_data/)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind (0.0.0.0: every interface)."),
    port: int = typer.Option(8050, "--port", help="TCP port."),
    workers: int = typer.Option(4, "--workers", help="Worker threads of the waitress server."),
) -> None:
    """Open the dashboard over recordings (waitress server; debug off)."""
    from attnviz.app.server import serve as run_server

    run_server(files or [], host=host, port=port, workers=workers)


@app.command()
def demo(
    host: str = typer.Option("127.0.0.1", "--host", help="Interface to bind."),
    port: int = typer.Option(8050, "--port", help="TCP port."),
    workers: int = typer.Option(4, "--workers", help="Worker threads of the waitress server."),
) -> None:
    """Open the dashboard on the bundled demo recordings (sample_data/*.h5)."""
    from attnviz.app.server import sample_data_files, serve as run_server

    run_server(sample_data_files(), host=host, port=port, workers=workers)


@app.command()
def report(
    file: Path = typer.Argument(..., help="A recording (.h5)."),
    out: Path = typer.Option(..., "--out", help="Output folder (created) for the images and index.html."),
    fmt: str = typer.Option("png", "--format", help="png or svg."),
    samples: Optional[str] = typer.Option(None, "--samples", help="Samples for per-sample views, e.g. 0,3,10-12 "
                                          "(default: the first 3)."),
    views: Optional[str] = typer.Option(None, "--views", help="Comma-separated view names (default: all)."),
    width: int = typer.Option(900, "--width", help="Image width in pixels."),
    height: int = typer.Option(600, "--height", help="Image height in pixels."),
) -> None:
    """Export the dashboard's views as PNG/SVG images plus an index.html linking them."""
    from attnviz.report import write_report

    index = write_report(file, out, fmt=fmt, samples=samples, views=views, width=width, height=height)
    typer.echo(f"wrote {index}")


def _raised_in_hdf5(e: BaseException) -> bool:
    """True when ``e`` (an OSError/RuntimeError/ValueError/KeyError) was raised inside h5py: a damaged or
    concurrently changed file, not a bug of attnviz."""
    import traceback

    if not isinstance(e, (OSError, RuntimeError, ValueError, KeyError)):
        return False
    frames = traceback.extract_tb(e.__traceback__)
    return bool(frames) and any(f"{'/'}h5py{'/'}" in fr.filename.replace("\\", "/") for fr in frames[-3:])


def main(argv: Optional[list[str]] = None) -> None:
    """Console entry point: runs the typer app, turning user errors into one line and exit code 2."""
    try:
        result = app(args=argv, standalone_mode=False)
    except AttnvizError as e:
        typer.echo(f"error: {e}", err=True)
        sys.exit(2)
    except typer.Exit as e:
        sys.exit(e.exit_code)
    except typer.Abort:
        typer.echo("error: aborted", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        typer.echo("error: interrupted", err=True)
        sys.exit(130)
    except Exception as e:
        # click's usage errors (bad option, missing argument) carry format_message()
        if hasattr(e, "format_message") and hasattr(e, "exit_code"):
            typer.echo(f"error: {e.format_message()}", err=True)
            sys.exit(2)
        if _raised_in_hdf5(e):  # a damaged file found deep inside a read: still one line
            text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            typer.echo(f"error: a recording cannot be read: damaged or changed while reading ({text})", err=True)
            sys.exit(2)
        raise
    # without standalone mode, click turns Ctrl-C into the return value 130 instead of raising
    if result == 130:
        typer.echo("error: interrupted", err=True)
        sys.exit(130)


__all__ = ["app", "main", "fail", "InputError"]
