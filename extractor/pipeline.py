"""The extraction pipeline behind ``attnviz extract``.

Order of work (every user mistake is found before anything slow or destructive happens):

1. check the options and the output path (:func:`attnviz.store.check_output_path`), the device;
2. find the model and its architecture (config only), enumerate and decode-check the inputs;
3. load the model, create (or resume) the recording;
4. per batch: prepare the next batch in a background thread while the model runs this one; one
   forward with ``output_attentions=True``; the maps leave the device once, as one float16 array
   ``[batch, layer, head, query_pos, key_pos]``; attributions; the writer's thread compresses and
   writes while the next batch runs;
5. ``writer.finish()`` (mark complete, rename), then basic per-head statistics.

An interruption (Ctrl-C, an error) flushes the finished batches and leaves ``<out>.partial``;
``--resume`` recomputes only the batches not marked done, with the same batch boundaries, so the
resumed file equals an uninterrupted run.
"""

from __future__ import annotations

import os
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from attnviz.analysis.head_stats import HeadStatsAccumulator
from attnviz.errors import DiskFullError, InputError, ModelError
from attnviz.store import RecordingWriter, SampleBatch, check_output_path, partial_path
from attnviz.store.merge import shard_path
from extractor.adapters import Adapter, detect, get_adapter, load_config, resolve_model
from extractor.adapters.base import class_names_of
from extractor.device import resolve_device, resolve_dtype
from extractor.audio import collect_audio
from extractor.inputs import InputSet, collect_images
from extractor.loading import fingerprint_differences, model_fingerprint
from extractor.targets import TARGET_NAMES, Target
from extractor.vqa_inputs import collect_vqa

# adapter.input_kind -> function enumerating and checking the inputs of that kind
INPUT_COLLECTORS = {"image": collect_images, "image+prompt": collect_vqa, "audio": collect_audio}

__all__ = ["ExtractOptions", "ExtractResult", "extract", "parse_attributions", "parse_image_size",
           "resolve_compression", "format_rate", "COMPRESSIONS", "TARGETS", "DEFAULT_ATTRIBUTIONS", "DryRunEstimate",
           "STORE_MODES", "DEFAULT_STORE_ROWS", "query_rows"]

COMPRESSIONS = ("auto", "lzf", "gzip", "none")
TARGETS = TARGET_NAMES
#: what ``--attributions`` records for an image model when not given (``Adapter.default_attributions``):
#: the cheap methods (rollout costs nothing but matrix products of the recorded maps, saliency one backward
#: pass); integrated gradients and occlusion cost tens to hundreds of forward passes per image
DEFAULT_ATTRIBUTIONS = ("rollout", "saliency")
#: ``--attributions all``: every method of the model's input kind
ALL_ATTRIBUTIONS = "all"
# parameters that change what is recorded: a resumed run must use the same ones
_RESUME_KEYS = ("model_class", "attributions", "target", "dtype", "image_size", "store_qk", "family_options", "store",
                "store_rows")
#: what a resumable key means when a partial file (written before the key existed) lacks it
_RESUME_DEFAULTS = {"store": "full", "store_rows": None}
#: seeds the per-sample choice of token positions whose query/key vectors are stored
QK_SEED = 20231105
#: ``--store``: what is kept of the attention maps (docs/extract.md)
STORE_MODES = ("full", "rows", "summary")
#: ``--store-rows``: query patches per sample whose rows ``--store rows`` keeps (besides the prefix rows)
DEFAULT_STORE_ROWS = 16
#: seeds the per-sample choice of query patches whose rows ``--store rows`` keeps
ROWS_SEED = 20240613
#: families whose stacks ``--store rows|summary`` can record (fixed-length patch stacks)
STORE_FAMILIES = ("vit",)


@dataclass(frozen=True)
class ExtractOptions:
    """Everything ``attnviz extract`` takes (see ``docs/extract.md``).

    Attributes:
        model: a ``save_pretrained`` directory or a hub id in the local cache.
        input: an image, a folder of images, or a ``.jsonl``/``.csv`` manifest.
        out: the recording to write (``.h5``).
        family: expected model family ("vit"); None = detect from the config.
        device: "auto" | "cpu" | "cuda".  dtype: "float32" | "float16" | "bfloat16" (GPU).
        batch_size: images per forward (and per resumable unit).
        limit: record at most this many images.
        attributions: method names; None = the family's defaults (images: rollout, saliency); "all" = every
            method of the family's input kind; () = attention only.
        target: what attributions explain (:mod:`extractor.targets`): "auto" (the predicted class of a
            classifier, the embedding norm of a backbone), "predicted", "label", "embedding_norm",
            "embedding_similarity".
        image_size: (height, width) to record at instead of the model's own input size (position
            embeddings interpolated), or None.
        family_options: options only one model family takes (s2t: beam size, saliency masks, ...), passed
            to its adapter's ``load``; an option the family does not take is an InputError.
        store_qk: also store every head's query and key vectors at this fraction of each sample's token
            positions (prefix tokens always, the rest drawn at random per sample, seeded by its index),
            for the joint query-key view; 0 = none, 1 = every position.
        compression: "auto" | "lzf" | "gzip" | "none"; "auto" = lzf when the model runs on a GPU, none
            on the CPU (see :func:`resolve_compression`).
        store: "full" (every map), "rows" (the prefix rows and ``store_rows`` sampled query patches of every map,
            :func:`query_rows`) or "summary" (no maps: per-head statistics only); image models only.
        store_rows: query patches per sample ``store="rows"`` keeps (all of them when the image has fewer).
        dry_run: estimate the file size and the time, write nothing (:class:`DryRunEstimate`).
        overwrite / resume: replace an existing output / continue an interrupted one.
        progress: show a progress bar on stderr.
    """

    model: str
    input: str
    out: str
    family: str | None = None
    device: str = "auto"
    dtype: str = "float32"
    batch_size: int = 8
    limit: int | None = None
    attributions: tuple[str, ...] | str | None = None
    target: str = "auto"
    image_size: tuple[int, int] | None = None
    store_qk: float = 0.0
    family_options: dict[str, Any] = field(default_factory=dict)
    compression: str = "auto"
    store: str = "full"
    store_rows: int = DEFAULT_STORE_ROWS
    dry_run: bool = False
    overwrite: bool = False
    resume: bool = False
    progress: bool = True


@dataclass
class ExtractResult:
    """What an extraction did.

    Attributes:
        path: the complete recording.
        n_samples: samples in it; n_recorded: samples computed by this call (fewer when resumed).
        seconds: wall time of the per-batch loop (until the last batch is on disk);
        head_stats_seconds: time of the per-head statistics afterwards.
        accuracy: on labelled samples, or None.
        skipped: (input, reason) of unreadable inputs.
        adapter: the loaded model, for follow-up steps on the same model (e.g. head importance).
    """

    path: Path
    n_samples: int
    n_recorded: int
    seconds: float
    accuracy: float | None
    skipped: list[tuple[str, str]] = field(default_factory=list)
    adapter: Adapter | None = None
    head_stats_seconds: float = 0.0

    @property
    def images_per_second(self) -> float:
        return self.n_recorded / self.seconds if self.seconds > 0 else float("nan")

    @property
    def rate(self) -> str:
        """The speed as people read it: "12.3 img/s", or "4.2 s/img" when slower than one image a second
        ("clip" for audio)."""
        unit = "img" if self.adapter is None or self.adapter.input_noun == "image" else self.adapter.input_noun
        return format_rate(self.n_recorded, self.seconds, unit)


def format_rate(n: int, seconds: float, unit: str = "img") -> str:
    """``n`` items in ``seconds`` as "12.3 img/s", or "4.2 s/img" when slower than one a second (a
    rate of 0.0 img/s says nothing); "no images recorded" for n = 0."""
    if n <= 0:
        return f"no {unit}s recorded"
    if seconds <= 0:
        return f"{n} {unit} in no measurable time"
    per_second = n / seconds
    if per_second >= 1:
        return f"{per_second:.1f} {unit}/s"
    per_item = seconds / n
    return f"{per_item:.1f} s/{unit}" if per_item < 600 else f"{per_item / 60:.1f} min/{unit}"


def parse_attributions(text: str | Sequence[str] | None) -> tuple[str, ...] | str | None:
    """``--attributions`` -> method names: None/"default" = None (the family's defaults), "all" =
    :data:`ALL_ATTRIBUTIONS` (every method of the model's input kind), "none" = (), else a comma list checked
    against the registry (unknown name -> InputError listing the available ones)."""
    from extractor import attributions as A

    if text is None:
        return None
    parts = [p.strip() for p in (text.split(",") if isinstance(text, str) else text) if p.strip()]
    if not parts or parts == ["default"]:
        return None
    if parts == ["all"]:
        return ALL_ATTRIBUTIONS
    if parts == ["none"]:
        return ()
    if {"none", "all", "default"} & set(parts):
        raise InputError("--attributions: 'none', 'all' and 'default' cannot be combined with method names")
    for p in parts:
        A.get(p)
    return tuple(dict.fromkeys(parts))


def parse_image_size(text: str | None) -> tuple[int, int] | None:
    """``--image-size``: "224" (square) or "HxW" (e.g. "448x336") -> (height, width); None stays None."""
    if text is None or not str(text).strip():
        return None
    parts = str(text).lower().replace(" ", "").split("x")
    try:
        vals = [int(p) for p in parts]
    except ValueError:
        raise InputError(f"--image-size: cannot read {text!r}; give a size like 224 or 448x336 (height x width)") from None
    if len(vals) == 1:
        vals = vals * 2
    if len(vals) != 2 or min(vals) < 1:
        raise InputError(f"--image-size: cannot read {text!r}; give a size like 224 or 448x336 (height x width)")
    return vals[0], vals[1]


def resolve_compression(name: str, device: torch.device) -> str:
    """``auto`` -> "lzf" on a GPU run, "none" on a CPU run; other names unchanged.

    Why: float16 attention probabilities have noisy mantissas, so lzf shrinks maps by 0-20 % only, at
    ~75 MB/s per core. On a GPU run the writer thread has a core to itself and compression is free; on a
    CPU run torch already uses every core and lzf adds ~40 % CPU time to a ViT-S/16 extraction for no
    gain in size (``benchmarks/extract_vit.py``, ``docs/extract.md``).
    """
    if name != "auto":
        return name
    return "lzf" if device.type == "cuda" else "none"


def extract(opts: ExtractOptions) -> ExtractResult | DryRunEstimate:
    """Record attention maps (and logits, thumbnails, masks, attributions) of every input.

    Returns:
        :class:`ExtractResult`, or with ``opts.dry_run`` a :class:`DryRunEstimate` (nothing written).

    Raises:
        InputError / ModelError: user mistakes, before anything is written or overwritten.
        KeyboardInterrupt: passed on after keeping ``<out>.partial`` for ``--resume``.
    """
    from extractor import attributions as A

    # 1. options and paths: cheap checks first, nothing loaded yet
    if opts.batch_size < 1:
        raise InputError(f"--batch-size must be at least 1, got {opts.batch_size}")
    if opts.compression not in COMPRESSIONS:
        raise InputError(f"unknown compression {opts.compression!r}; choose one of {', '.join(COMPRESSIONS)}")
    if not isinstance(opts.target, str) or not opts.target:
        raise InputError(f"--target must name a target, got {opts.target!r}")
    if not 0.0 <= float(opts.store_qk) <= 1.0:
        raise InputError(f"--store-qk must be a fraction of the tokens in (0, 1] (or 0 for none), got {opts.store_qk}")
    if opts.store not in STORE_MODES:
        raise InputError(f"--store must be one of {', '.join(STORE_MODES)}, got {opts.store!r}")
    if int(opts.store_rows) < 1:
        raise InputError(f"--store-rows must be at least 1 query patch per image, got {opts.store_rows}")
    if opts.image_size is not None and (len(opts.image_size) != 2 or min(opts.image_size) < 1):
        raise InputError(f"--image-size must be a positive height x width, got {opts.image_size}")
    if opts.family is not None:
        get_adapter(opts.family)
    final_out = Path(opts.out)
    dist = distributed_rank()
    out = final_out if dist is None else shard_path(final_out, dist.rank, dist.world_size)
    if dist is not None and dist.rank == 0 and not opts.resume:
        check_output_path(final_out, overwrite=opts.overwrite, resume=False)
    check_output_path(out, overwrite=opts.overwrite, resume=opts.resume, probe=not opts.dry_run)
    device = resolve_device(opts.device)
    if dist is not None and device.type == "cuda":
        device = torch.device("cuda", dist.local_rank % max(torch.cuda.device_count(), 1))
    autocast_dtype = resolve_dtype(opts.dtype, device)
    compression = resolve_compression(opts.compression, device)
    if isinstance(opts.attributions, str) and opts.attributions != ALL_ATTRIBUTIONS:
        raise InputError(f"attributions must be method names, None or {ALL_ATTRIBUTIONS!r}, got {opts.attributions!r}")
    for m in (opts.attributions if isinstance(opts.attributions, tuple) else ()):
        A.get(m)

    # 2. model (config only) and inputs
    source = resolve_model(opts.model)
    config = load_config(source)
    arch = detect(config)
    if opts.family is not None and arch.family != opts.family:
        raise ModelError(f"{source.ref} is a {arch.model_class} ({arch.family} family), not a {opts.family} model")
    adapter_cls = get_adapter(arch.family)
    if opts.store != "full" and adapter_cls.name not in STORE_FAMILIES:
        raise InputError(f"--store {opts.store} is implemented for image models (the {', '.join(STORE_FAMILIES)} "
                         f"family); a {adapter_cls.name} model records its full maps: leave --store out")
    # the weights are checked (and identified) before anything slow: a damaged file is one line now
    fingerprint = model_fingerprint(source.path, config, arch.model_class)
    if opts.store_qk and not adapter_cls.supports_qk:
        raise InputError(f"--store-qk does not apply to a {adapter_cls.name} model (it stores the query and key vectors "
                         "of a self-attention stack over image tokens); leave it out")
    if opts.attributions is None:
        methods = list(adapter_cls.default_attributions)
    elif opts.attributions == ALL_ATTRIBUTIONS:
        methods = A.available(adapter_cls.input_kind)
    else:
        methods = list(opts.attributions)
    target = adapter_cls.resolve_target(opts.target, arch)
    if methods:
        adapter_cls.check_attributions(methods, target)
        if opts.attributions == ALL_ATTRIBUTIONS and target.zero_gradient and "saliency" in methods:
            methods.remove("saliency")  # undefined for this target (check_methods says why); "all" means the rest
    # a backbone without a classification head has no classes: the inputs' own labels name them
    model_classes = class_names_of(config) if arch.has_classifier else None
    inputs = INPUT_COLLECTORS[adapter_cls.input_kind](opts.input, class_names=model_classes, limit=opts.limit,
                                                      **adapter_cls.collect_options(source, config, arch))
    shard_offset = 0
    if dist is not None:  # this rank's contiguous slice; every rank enumerated the same inputs
        import dataclasses

        shard_offset, stop = dist.slice(len(inputs.items))
        if shard_offset >= stop:
            raise InputError(f"rank {dist.rank} of {dist.world_size} has no inputs: {len(inputs.items)} input(s) "
                             f"for {dist.world_size} ranks; use fewer processes")
        inputs = dataclasses.replace(inputs, items=inputs.items[shard_offset:stop])
    if target.name == "label":
        unlabelled = [it.id for it in inputs.items if it.label < 0]
        if unlabelled:
            raise InputError(f"--target label needs a label for every input; {len(unlabelled)} have none "
                             f"(first: {unlabelled[0]})")

    # 3. model and file
    load_options = dict(opts.family_options)
    if opts.image_size is not None:
        load_options["image_size"] = tuple(opts.image_size)
    adapter = adapter_cls.load(source, config, arch, device=device, autocast_dtype=autocast_dtype, **load_options)
    adapter.plan(inputs.items)
    layout = adapter.main_layout
    specs = adapter.attribution_specs(methods, target)
    params = {
        "model": source.ref, "model_snapshot": str(source.path) if source.from_cache else None,
        "model_class": adapter.model_class, "output": "logits" if adapter.has_classifier else arch.output,
        "input": str(opts.input), "limit": opts.limit, "attributions": methods, "target": target.name,
        "target_definition": target.definition if methods else None,
        "image_size": list(layout.image_size) if opts.image_size is not None else None,
        "store_qk": float(opts.store_qk), "family_options": dict(opts.family_options),
        "dtype": opts.dtype, "device": device.type, "batch_size": opts.batch_size,
        "compression": compression, "torch": torch.__version__, "family": adapter.extra_params(),
        "store": opts.store, "store_rows": int(opts.store_rows) if opts.store == "rows" else None,
        "rows_seed": ROWS_SEED if opts.store == "rows" else None,
    }
    stacks = _with_rows(_with_qk(adapter, opts.store_qk), opts.store, opts.store_rows)
    per_sample = adapter.per_sample_specs()
    if opts.store != "full":  # each sample's own head statistics: recomputable without the maps
        from attnviz.analysis.head_stats import per_sample_specs

        main = stacks[0]
        per_sample = [*per_sample, *per_sample_specs(main.n_layers, main.n_heads, main.layout.n_prefix)]
    create_args = dict(
        family=adapter.name, model_name=adapter.model_name, model_class=adapter.model_class,
        sample_ids=inputs.ids, stacks=stacks,
        class_names=adapter.class_names if adapter.has_classifier else list(inputs.class_names),
        labels=np.array([it.label for it in inputs.items], np.int32),
        thumbnail_shape=adapter.thumbnail_size,
        mask_shape=adapter.thumbnail_size if inputs.has_masks else None,
        attributions=specs, batch_size=opts.batch_size, compression=compression,
        model_config=adapter.config_dict(), extraction_params=params,
        target_source="label" if inputs.has_labels else "prediction",
        skipped=inputs.skipped, with_meta=adapter.writes_meta, per_sample=per_sample,
        model_fingerprint=fingerprint, store=opts.store,
        shard=None if dist is None else (dist.rank, dist.world_size, shard_offset),
    )
    if opts.dry_run:
        return _dry_run(adapter, inputs, create_args, methods, target, opts, compression)
    if opts.resume:
        writer = RecordingWriter.resume(out, sample_ids=inputs.ids)
        stored_fp = writer.model_fingerprint
        if stored_fp is not None:
            diffs = fingerprint_differences(stored_fp, fingerprint, writer.model_config, config)
            if diffs:
                writer.close()
                raise InputError(f"{partial_path(out)} was recorded with another model: {'; '.join(diffs)} differ; "
                                 "resume with the model that made it, or start again with --overwrite")
        stored = writer.params
        for key in _RESUME_KEYS:
            if key not in stored and key not in _RESUME_DEFAULTS:
                continue
            was = stored.get(key, _RESUME_DEFAULTS.get(key))
            if was != params[key]:
                writer.close()
                option = {"store": "--store", "store_rows": "--store-rows"}.get(key, key)
                raise InputError(f"{partial_path(out)} was recorded with {option}={was!r}, this run has "
                                 f"{params[key]!r}; resume with the same options or use --overwrite")
    else:
        writer = RecordingWriter.create(out, overwrite=opts.overwrite, **create_args)

    # 4. the loop
    todo = writer.pending_batches()
    n_todo = sum(stop - start for start, stop in todo)
    t0 = time.perf_counter()
    # per-head statistics accumulated from the maps while they are in memory (no read-back at the end);
    # a resumed run has not seen the earlier batches and computes them from the file instead
    main_stack = adapter.stacks()[0]
    stats = None if opts.resume else HeadStatsAccumulator(main_stack.kind, main_stack.n_layers, main_stack.n_heads,
                                                           main_stack.layout.n_prefix)
    if stats is None and opts.store != "full":
        # the per-sample statistics of the batches still to do must be computed (the file has no maps to read
        # them back from); the means are recomputed from the file's per-sample rows after the loop
        stats = HeadStatsAccumulator(main_stack.kind, main_stack.n_layers, main_stack.n_heads,
                                     main_stack.layout.n_prefix)
    try:
        _run_batches(adapter, inputs, writer, todo, methods, target, opts, stats)
    except BaseException as e:
        writer.close()  # finished batches stay: --resume continues from them
        if partial_path(out).exists() and not isinstance(e, DiskFullError):  # that message says it already
            print(f"note: the finished batches are kept in {partial_path(out)}; continue with --resume",
                  file=sys.stderr)
        raise
    # the writer's thread may still be compressing: finish() waits for it
    path = writer.finish()
    seconds = time.perf_counter() - t0

    # 5. basic per-head statistics, so the dashboard has them without `attnviz analyze`
    t1 = time.perf_counter()
    _store_head_stats(path, None if opts.resume else stats)
    _family_analyses(adapter, path)
    stats_seconds = time.perf_counter() - t1

    import attnviz

    if dist is not None:  # every rank's shard is done: rank 0 joins them (when the ranks can meet)
        merged = dist.merge_when_all_done(final_out, overwrite=opts.overwrite)
        if merged is not None:
            path = merged
    with attnviz.open(path) as rec:
        accuracy = rec.accuracy
        n = rec.n_samples
        skipped = rec.skipped()
    return ExtractResult(path=path, n_samples=n, n_recorded=n_todo, seconds=seconds, accuracy=accuracy,
                         skipped=skipped, adapter=adapter, head_stats_seconds=stats_seconds)


@dataclass(frozen=True)
class DistributedRank:
    """This process's place in a ``torchrun`` launch (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``)."""

    rank: int
    world_size: int
    local_rank: int

    def slice(self, n: int) -> tuple[int, int]:
        """(start, stop) of this rank's contiguous share of ``n`` inputs (the first ``n % world`` get one more)."""
        base, extra = divmod(n, self.world_size)
        start = self.rank * base + min(self.rank, extra)
        return start, start + base + (1 if self.rank < extra else 0)

    def merge_when_all_done(self, out: Path, *, overwrite: bool) -> Path | None:
        """Wait for every rank (a gloo barrier, when torchrun gave a rendezvous address), then rank 0 merges
        the shards into ``out`` as virtual datasets. Without a rendezvous nothing waits: run
        ``attnviz merge`` afterwards. Returns the merged path on rank 0, else None."""
        import torch.distributed as td

        if not os.environ.get("MASTER_ADDR"):
            if self.rank == 0:
                print(f"note: shards written as {shard_path(out, 0, self.world_size).name} ...; join them with "
                      f"`attnviz merge {out} {out.with_suffix('')}.shard*.h5`", file=sys.stderr)
            return None
        own = not td.is_initialized()
        if own:
            td.init_process_group("gloo")
        try:
            td.barrier()
            merged = None
            if self.rank == 0:
                from attnviz.store.merge import merge_shards

                merged = merge_shards(out, [shard_path(out, r, self.world_size) for r in range(self.world_size)],
                                      overwrite=overwrite)
            td.barrier()
            return merged
        finally:
            if own:
                td.destroy_process_group()


def distributed_rank() -> DistributedRank | None:
    """The torchrun rank of this process, or None outside a multi-process launch."""
    try:
        world = int(os.environ.get("WORLD_SIZE", "1"))
        rank = int(os.environ.get("RANK", "0"))
        local = int(os.environ.get("LOCAL_RANK", str(rank)))
    except ValueError:
        raise InputError("RANK / WORLD_SIZE / LOCAL_RANK must be integers (as torchrun sets them)") from None
    if world <= 1:
        return None
    if not 0 <= rank < world:
        raise InputError(f"RANK={rank} is outside WORLD_SIZE={world}")
    return DistributedRank(rank=rank, world_size=world, local_rank=local)


def _with_qk(adapter: Adapter, fraction: float) -> list[Any]:
    """The adapter's stacks, the main one with room for query/key vectors when ``fraction`` > 0."""
    import dataclasses

    stacks = adapter.stacks()
    if fraction <= 0:
        return stacks
    main = stacks[0]
    n_tokens = max(main.max_query, main.max_key)
    head_dim = _head_dim(adapter, main.kind)
    n_keep = qk_token_count(n_tokens, main.layout.n_prefix, fraction)
    return [dataclasses.replace(main, qk_tokens=n_keep, head_dim=head_dim, qk_fraction=float(fraction)), *stacks[1:]]


def _head_dim(adapter: Adapter, kind: str) -> int:
    (_, _, q0), = adapter.modules("query", kind)[:1]
    (_, _, k0), = adapter.modules("key", kind)[:1]
    n_heads = adapter.stack(kind).n_heads
    if q0.out_features != k0.out_features or q0.out_features % n_heads:
        raise ModelError(f"{adapter.model_class}: query and key projections of {q0.out_features} and "
                         f"{k0.out_features} features do not split into {n_heads} equal heads; --store-qk needs that")
    return q0.out_features // n_heads


def qk_token_count(n_tokens: int, n_prefix: int, fraction: float) -> int:
    """How many positions ``--store-qk fraction`` keeps: every prefix token plus the fraction of the rest
    (at least one), all of them for fraction 1."""
    if fraction >= 1:
        return n_tokens
    rest = n_tokens - n_prefix
    return min(n_tokens, n_prefix + max(1, int(np.ceil(fraction * rest))))


def qk_positions(sample: int, n_tokens: int, n_prefix: int, n_keep: int) -> np.ndarray:
    """The sorted token positions of ``sample`` whose vectors are stored: the prefix tokens, then
    ``n_keep - n_prefix`` others drawn without replacement from a generator seeded by the sample's
    index (so a resumed run draws the same ones)."""
    if n_keep >= n_tokens:
        return np.arange(n_tokens, dtype=np.int64)
    rng = np.random.default_rng([QK_SEED, int(sample)])
    rest = n_prefix + rng.choice(n_tokens - n_prefix, n_keep - n_prefix, replace=False)
    return np.sort(np.concatenate([np.arange(n_prefix), rest])).astype(np.int64)


def _with_rows(stacks: list[Any], store: str, store_rows: int) -> list[Any]:
    """The stacks, each with room for ``--store rows``' query rows (its prefix rows + ``store_rows`` patches)."""
    import dataclasses

    if store != "rows":
        return stacks
    return [dataclasses.replace(st, rows=row_count(st.max_query, st.layout.n_prefix, store_rows)) for st in stacks]


def row_count(n_tokens: int, n_prefix: int, store_rows: int) -> int:
    """Query rows per sample ``--store rows`` keeps: every prefix row plus ``store_rows`` of the others (all of
    them when there are fewer)."""
    return n_prefix + min(int(store_rows), n_tokens - n_prefix)


def query_rows(sample: int, n_tokens: int, n_prefix: int, n_rows: int) -> np.ndarray:
    """The sorted query positions of ``sample`` whose rows ``--store rows`` keeps: the prefix tokens (CLS,
    registers), then ``n_rows - n_prefix`` query patches drawn without replacement, uniformly, by
    ``numpy.random.default_rng([ROWS_SEED, sample])`` (so the same image index always gets the same rows, and a
    resumed run draws what the interrupted one would have)."""
    if n_rows >= n_tokens:
        return np.arange(n_tokens, dtype=np.int64)
    rng = np.random.default_rng([ROWS_SEED, int(sample)])
    rest = n_prefix + rng.choice(n_tokens - n_prefix, n_rows - n_prefix, replace=False)
    return np.sort(np.concatenate([np.arange(n_prefix), rest])).astype(np.int64)


def select_rows(maps: np.ndarray, start: int, n_prefix: int, n_rows: int) -> tuple[np.ndarray, np.ndarray]:
    """A batch's stored rows: maps float ``[b, layer, head, query_pos, key_pos]`` of samples ``start ..`` ->
    (positions int32 ``[b, row]``, rows float16 ``[b, layer, head, row, key_pos]``), the rows exactly as in the maps."""
    b, n_tokens = maps.shape[0], maps.shape[-2]
    pos = np.stack([query_rows(start + j, n_tokens, n_prefix, n_rows) for j in range(b)])
    rows = np.stack([maps[j][:, :, pos[j], :] for j in range(b)]).astype(np.float16, copy=False)
    return pos.astype(np.int32), rows


def _qk_capture(adapter: Adapter, kind: str) -> Any:
    """Context capturing one forward's query and key projections: yields (queries, keys) dicts layer ->
    ``[batch, seq, head, head_dim]``."""
    import contextlib

    from extractor.hooks import capture_projections

    n_heads = adapter.stack(kind).n_heads

    @contextlib.contextmanager
    def both():
        q_mods = [m for _, _, m in adapter.modules("query", kind)]
        k_mods = [m for _, _, m in adapter.modules("key", kind)]
        with capture_projections(q_mods, n_heads) as q, capture_projections(k_mods, n_heads) as k:
            yield q, k

    return both()


def _select_qk(captured: tuple[dict[int, torch.Tensor], dict[int, torch.Tensor]], start: int, n_prefix: int,
               n_keep: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The stored positions of each sample of a batch and their vectors: positions ``[b, T]``, queries and
    keys float16 ``[b, layer, head, T, head_dim]``."""
    q, k = captured
    n_layers = len(q)
    b, seq = q[0].shape[:2]
    pos = np.stack([qk_positions(start + j, seq, n_prefix, n_keep) for j in range(b)])  # [b, T]
    index = torch.as_tensor(pos, device=q[0].device)

    def pick(d: dict[int, torch.Tensor]) -> np.ndarray:
        # [b, seq, head, dim] per layer -> [b, layer, head, T, dim]
        stacked = torch.stack([d[layer] for layer in range(n_layers)], 1)  # [b, layer, seq, head, dim]
        idx = index.view(b, 1, -1, 1, 1).expand(b, n_layers, index.shape[1], *stacked.shape[3:])
        return torch.gather(stacked, 2, idx).transpose(2, 3).to(torch.float16).cpu().numpy()

    return pos.astype(np.int32), pick(q), pick(k)


def _run_batches(adapter: Adapter, inputs: InputSet, writer: RecordingWriter, todo: list[tuple[int, int]],
                 methods: list[str], target: Target, opts: ExtractOptions,
                 stats: HeadStatsAccumulator | None = None) -> None:
    items = inputs.items
    n_todo = sum(stop - start for start, stop in todo)
    bar = _progress(total=len(items), initial=len(items) - n_todo, enabled=opts.progress,
                    unit="img" if adapter.input_noun == "image" else adapter.input_noun)
    main_kind = adapter.stacks()[0].kind
    shape = _BatchShape(n_columns=writer.n_logit_columns, n_keep_qk=writer.qk_tokens(main_kind),
                        n_rows=writer.rows_per_sample(main_kind), store=opts.store)
    # one thread reads and preprocesses the next batch while the model runs this one. On a GPU another one adds
    # the batch's maps to the per-head statistics (numpy releases the GIL) while the next forward runs; on the
    # CPU the forward already keeps every core busy, and a third busy thread stalls torch's intra-op threads at
    # each of their barriers (measured on 2 cores: the run 1.42x the bare forward with the stats thread, see
    # docs/performance.md), so there the statistics run between the forwards
    overlap_stats = _overlap_stats(adapter)
    stats_done: Future[Any] | None = None
    with bar, ThreadPoolExecutor(max_workers=1, thread_name_prefix="attnviz-prepare") as pool, \
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="attnviz-stats") as stats_pool:
        pending: Future[Any] | None = pool.submit(adapter.prepare, items[todo[0][0]:todo[0][1]]) if todo else None
        for i, (start, stop) in enumerate(todo):
            assert pending is not None
            batch = pending.result()
            pending = pool.submit(adapter.prepare, items[todo[i + 1][0]:todo[i + 1][1]]) if i + 1 < len(todo) else None
            sample_batch, main_maps, main_lengths = _record_batch(adapter, batch, start, stop, methods, target, shape,
                                                                  stats)
            if stats is not None and opts.store == "full":
                if stats_done is not None:
                    stats_done.result()  # one batch at a time: bounded memory, and errors surface here
                if overlap_stats:
                    stats_done = stats_pool.submit(stats.add, main_maps, main_lengths)
                else:
                    stats.add(main_maps, main_lengths)
            writer.write(sample_batch)
            bar.update(stop - start)
        if stats_done is not None:
            stats_done.result()


def _overlap_stats(adapter: Adapter) -> bool:
    """Whether the per-head statistics run in their own thread beside the next forward (on a GPU)."""
    return adapter.device.type == "cuda"


@dataclass(frozen=True)
class _BatchShape:
    """What one recorded batch holds besides the model's outputs (from the file being written)."""

    n_columns: int
    n_keep_qk: int = 0
    n_rows: int = 0
    store: str = "full"


def _record_batch(adapter: Adapter, batch: Any, start: int, stop: int, methods: list[str], target: Target,
                  shape: _BatchShape, stats: HeadStatsAccumulator | None) -> tuple[SampleBatch, np.ndarray, Any]:
    """One forward (and attributions) of a prepared batch -> what the writer stores, with the main stack's maps
    ``[b, layer, head, query_pos, key_pos]`` and lengths. Without full maps (``--store rows|summary``) the
    batch's per-sample head statistics are computed here (``stats``), since the file cannot give them back."""
    main_kind, layout = adapter.stacks()[0].kind, adapter.main_layout
    qk: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]] = {}
    with torch.no_grad():
        if shape.n_keep_qk:
            with _qk_capture(adapter, main_kind) as captured:
                out = adapter.run(batch)
            qk[main_kind] = _select_qk(captured, start, layout.n_prefix, shape.n_keep_qk)
        else:
            out = adapter.run(batch)
    # one device-to-host copy per kind and batch
    maps = {kind: m.cpu().numpy() for kind, m in out.attention.items()}
    b = stop - start
    if out.logits is not None:
        logits = out.logits.detach().cpu().numpy().astype(np.float32, copy=False)
        predictions = logits.argmax(axis=1).astype(np.int32)
    else:  # no classes to score (a backbone, a generative model): the file format's NaN
        logits = np.full((b, shape.n_columns), np.nan, np.float32)
        predictions = np.full(b, -1, np.int32)
    if out.predictions is not None:  # the family defines its own (generative models)
        predictions = np.asarray(out.predictions, np.int32)
    per_sample = dict(out.per_sample)
    rows: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    lengths = out.lengths
    if shape.store != "full":
        from attnviz.analysis.head_stats import per_sample_values

        assert stats is not None
        per_sample.update(per_sample_values(stats.add(maps[main_kind], out.lengths.get(main_kind)), layout.n_prefix))
        if shape.store == "rows":
            rows[main_kind] = select_rows(maps[main_kind], start, layout.n_prefix, shape.n_rows)
        lengths = {kind: np.asarray(out.lengths[kind]) if kind in out.lengths else
                   np.tile(np.array([m.shape[-2:]], np.int32), (b, 1)) for kind, m in maps.items()}
    attributions = adapter.attribute(methods, batch, out, target, predictions)
    sample_batch = SampleBatch(start=start, attention=maps if shape.store == "full" else {}, predictions=predictions,
                               logits=logits, lengths=lengths, labels=batch.labels, thumbnails=batch.thumbnails,
                               masks=batch.masks, attributions=attributions, qk=qk, meta=out.meta,
                               per_sample=per_sample, rows=rows)
    return sample_batch, maps[main_kind], out.lengths.get(main_kind)


@dataclass(frozen=True)
class DryRunEstimate:
    """What ``attnviz extract --dry-run`` found: the recording's size and time, nothing written.

    Attributes:
        n_samples: inputs that would be recorded; n_batches: forward batches.
        store: the store mode; compression: the resolved HDF5 filter.
        bytes_uncompressed: the file without compression, from :func:`attnviz.store.writer.estimate_size`: the
            layout of this run made in memory as the writer makes it on disk, the first batch's real data
            written into it, what it grew by per sample x the samples, plus the head metrics.
        bytes_compressed: the same with the chosen filter on that real data (equal for ``none``).
        batch_seconds: wall time of the first batch (preprocessing, forward, attributions); it includes the
            warm-up of the first forward, and excludes writing and the head statistics at the end.
        seconds: ``batch_seconds`` x ``n_batches``: a rough estimate of the per-batch loop.
    """

    n_samples: int
    n_batches: int
    batch_size: int
    store: str
    compression: str
    bytes_uncompressed: int
    bytes_compressed: int
    batch_seconds: float
    seconds: float

    def lines(self) -> list[str]:
        """The report ``--dry-run`` prints."""
        comp = ("the same: no compression" if self.compression == "none" else
                f"about {_size(self.bytes_compressed)} with {self.compression}")
        return [
            f"dry run: {self.n_samples} input(s) in {self.n_batches} batch(es) of {self.batch_size}, --store {self.store}; "
            "nothing written",
            f"estimated file size: {_size(self.bytes_uncompressed)} uncompressed; {comp} (the file laid out in memory "
            "as this run would write it, the first batch written into it, its growth per image x the images)",
            f"estimated time: {_duration(self.seconds)} for the batches ({_duration(self.batch_seconds)} measured for the "
            "first batch: preprocessing, forward, attributions; x the number of batches; the first forward includes "
            "warm-up, writing and the head statistics at the end are not included)",
        ]


def _size(n: int) -> str:
    for unit, scale in (("GB", 2**30), ("MB", 2**20), ("KB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n} B"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def _dry_run(adapter: Adapter, inputs: InputSet, create_args: dict[str, Any], methods: list[str], target: Target,
             opts: ExtractOptions, compression: str) -> DryRunEstimate:
    """Time the first batch and lay the file out in memory (:func:`attnviz.store.writer.estimate_size`)."""
    from attnviz.store.writer import estimate_size

    n = len(inputs.items)
    first = min(opts.batch_size, n)
    main = create_args["stacks"][0]
    stats = HeadStatsAccumulator(main.kind, main.n_layers, main.n_heads, main.layout.n_prefix)
    shape = _BatchShape(n_columns=max(len(create_args["class_names"]), 1), n_keep_qk=main.qk_tokens, n_rows=main.rows,
                        store=opts.store)
    t0 = time.perf_counter()
    batch = adapter.prepare(inputs.items[:first])
    sample_batch, main_maps, main_lengths = _record_batch(adapter, batch, 0, first, methods, target, shape, stats)
    if opts.store == "full":
        stats.add(main_maps, main_lengths)
    batch_seconds = time.perf_counter() - t0
    from attnviz.analysis.head_stats import write_head_stats

    uncompressed, compressed = estimate_size(sample_batch, lambda f: write_head_stats(f, stats.result()), **create_args)
    n_batches = -(-n // opts.batch_size)
    return DryRunEstimate(n_samples=n, n_batches=n_batches, batch_size=opts.batch_size, store=opts.store,
                          compression=compression, bytes_uncompressed=uncompressed, bytes_compressed=compressed,
                          batch_seconds=batch_seconds, seconds=batch_seconds * n_batches)


def _progress(*, total: int, initial: int, enabled: bool, unit: str = "img") -> Any:
    from tqdm.auto import tqdm

    # tqdm's bar shows [elapsed<remaining (the ETA), rate]; the rate flips to s/img below 1 img/s
    return tqdm(total=total, initial=initial, unit=unit, desc="extract", disable=not enabled,
                dynamic_ncols=True, file=sys.stderr)


def _store_head_stats(path: Path, stats: HeadStatsAccumulator | None = None) -> None:
    """Basic per-head statistics (``attnviz.analysis.head_stats``) stored into the finished file: those
    accumulated during the run, or (resumed run) computed from the file.

    The recording is complete at this point: a failure here is a warning, not a lost run.
    """
    from attnviz.analysis.head_stats import compute_and_store, store_head_stats

    try:
        if stats is not None:
            store_head_stats(path, stats.result())
        else:
            compute_and_store(path)
    except Exception as e:  # noqa: BLE001 - reported, and `attnviz analyze` can redo it
        print(f"warning: per-head statistics failed ({type(e).__name__}: {e}); run `attnviz analyze {path}`",
              file=sys.stderr)


def _family_analyses(adapter: Adapter, path: Path) -> None:
    """The family's own analyses of the finished file (:meth:`Adapter.after_recording`); as for the head
    statistics, a failure is a warning: the recording is complete, and `attnviz analyze` can redo it."""
    try:
        adapter.after_recording(path)
    except Exception as e:  # noqa: BLE001 - reported, and `attnviz analyze` can redo it
        print(f"warning: {adapter.name} analyses failed ({type(e).__name__}: {e}); run `attnviz analyze {path}`",
              file=sys.stderr)
