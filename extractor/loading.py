"""One guarded door for everything a model directory holds: weights, config, processor, tokenizer.

* :func:`check_weights` reads the safetensors files' headers before transformers sees them, so an
  empty, truncated or garbled ``model.safetensors`` (or a missing shard) is one line naming the file
  and what is wrong, instead of a safetensors traceback;
* :func:`guarded` turns any exception raised while loading (a shape mismatch, a dtype transformers
  refuses, a broken ``preprocessor_config.json``, ...) into a :class:`~attnviz.errors.ModelError`;
* :func:`model_fingerprint` identifies what produced a recording: model class, a hash of the config,
  a hash of the weights (the safetensors headers plus a sample of the tensor bytes, or every byte when
  the weights are small), the preprocessing and tokenizer files, so that ``--resume`` refuses to mix two
  models and ``attnviz info`` can show it.

Every adapter loads through these (``extractor/adapters/*.py``).
"""

from __future__ import annotations

import hashlib
import json
import struct
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from attnviz.errors import AttnvizError, ModelError

__all__ = ["weight_files", "check_weights", "guarded", "load_pretrained", "model_fingerprint",
           "fingerprint_differences", "FULL_HASH_LIMIT", "SAMPLE_BLOCKS", "SAMPLE_BLOCK_BYTES"]

#: weights up to this size are hashed completely; larger ones by header + evenly spaced blocks
FULL_HASH_LIMIT = 64 << 20
SAMPLE_BLOCKS = 64
SAMPLE_BLOCK_BYTES = 64 << 10
#: config keys that say how a config was saved or loaded, not what the model is
_VOLATILE_CONFIG_KEYS = ("transformers_version", "_name_or_path", "_attn_implementation",
                         "_attn_implementation_autoset", "_commit_hash", "attn_implementation")
#: processing files of a model directory whose content changes what the model sees
_PROCESSING_FILES = ("preprocessor_config.json", "processor_config.json", "tokenizer.json", "tokenizer_config.json",
                     "vocab.json", "merges.txt", "chat_template.jinja", "chat_template.json", "generation_config.json")


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a model directory: ``model.safetensors``, or every shard named by
    ``model.safetensors.index.json``."""
    single = path / "model.safetensors"
    index = path / "model.safetensors.index.json"
    if single.is_file():
        return [single]
    if index.is_file():
        try:
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise ModelError(f"{index}: cannot be read as a safetensors index ({_first_line(e)})") from None
        return [path / s for s in shards]
    return []


def check_weights(path: Path, ref: str | None = None) -> list[Path]:
    """Check every safetensors file of ``path`` without loading a tensor.

    A safetensors file is an 8-byte little-endian header length N, N bytes of JSON (tensor name ->
    dtype, shape, [begin, end) data offsets), then the tensor data; the file must be exactly as long as
    the largest end offset says.

    Returns:
        the weight files.

    Raises:
        ModelError: no safetensors weights (only a pickle ``pytorch_model.bin``, which attnviz does not
            load), or a file that is empty, truncated, padded or whose header does not parse.
    """
    who = ref or str(path)
    files = weight_files(path)
    if not files:
        pickle = [p.name for p in path.glob("*.bin")] + [p.name for p in path.glob("*.pt")]
        hint = (f" (found {', '.join(sorted(pickle))}: attnviz does not load pickled weights; re-save the model with "
                "save_pretrained(safe_serialization=True))" if pickle else "")
        raise ModelError(f"{who}: no model.safetensors in the model directory{hint}")
    for f in files:
        _check_safetensors(f)
    return files


def _check_safetensors(f: Path) -> None:
    if not f.is_file():
        raise ModelError(f"{f}: weight shard listed in model.safetensors.index.json is missing")
    size = f.stat().st_size
    if size == 0:
        raise ModelError(f"{f}: the weights file is empty (0 bytes); copy or save the model again")
    if size < 8:
        raise ModelError(f"{f}: the weights file is truncated ({size} bytes, shorter than its header)")
    with open(f, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        if n > size - 8:
            raise ModelError(f"{f}: the weights file is truncated (its header says {n} bytes of metadata, the file "
                             f"holds {size} bytes in all)")
        raw = fh.read(n)
    try:
        header = json.loads(raw)
        ends = [int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"]
    except (ValueError, TypeError, KeyError, IndexError, AttributeError) as e:
        raise ModelError(f"{f}: the weights file's header is damaged ({_first_line(e)})") from None
    data = size - 8 - n
    need = max(ends, default=0)
    if data < need:
        raise ModelError(f"{f}: the weights file is truncated: its tensors need {need} bytes of data, the file holds "
                         f"{data} ({100 * data / max(need, 1):.0f}%); copy or save the model again")
    if data > need:
        raise ModelError(f"{f}: the weights file has {data - need} bytes more than its tensors; it is damaged")


@contextmanager
def guarded(what: str, ref: str, hint: str = "") -> Iterator[None]:
    """Any exception inside (but an AttnvizError, KeyboardInterrupt, MemoryError) becomes one
    ``ModelError("<ref>: cannot load <what> (<first line of the cause>)<hint>")``."""
    try:
        yield
    except (AttnvizError, KeyboardInterrupt, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - transformers/safetensors/tokenizers raise many types
        raise ModelError(f"{ref}: cannot load {what} ({_first_line(e)}){hint}") from None


def load_pretrained(model_cls: Any, path: Path, ref: str, **kwargs: Any) -> Any:
    """``model_cls.from_pretrained(path, local_files_only=True, use_safetensors=True, **kwargs)`` through the
    door: the weights checked first, transformers' own loading report silenced (it prints a table per
    model), any failure one :class:`ModelError`, and weights the checkpoint lacks (randomly initialised by
    transformers) named in one warning line on stderr."""
    import sys

    from transformers.utils import logging as hf_logging

    check_weights(path, ref)
    verbosity = hf_logging.get_verbosity()
    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()  # attnviz shows its own progress
    try:
        try:
            model, info = model_cls.from_pretrained(path, local_files_only=True, use_safetensors=True,
                                                    output_loading_info=True, **kwargs)
        except Exception as e:  # noqa: BLE001 - classified below, always one line
            if "ignore_mismatched_sizes" in str(e):
                raise ModelError(f"{ref}: the weights do not fit config.json: "
                                 f"{_mismatch(model_cls, path, kwargs)}; config.json and model.safetensors come from "
                                 "different models") from None
            with guarded(f"{getattr(model_cls, '__name__', 'model')} weights", ref,
                         "; attnviz loads model.safetensors made by save_pretrained"):
                raise
    finally:
        hf_logging.set_verbosity(verbosity)
        if bar:
            hf_logging.enable_progress_bar()
    missing = list(info.get("missing_keys") or []) if isinstance(info, dict) else []
    if missing:
        shown = ", ".join(sorted(missing)[:4]) + (" ..." if len(missing) > 4 else "")
        print(f"warning: {ref}: {len(missing)} weight(s) of {type(model).__name__} are not in the checkpoint and were "
              f"initialised at random ({shown})", file=sys.stderr)
    return model


def _mismatch(model_cls: Any, path: Path, kwargs: dict[str, Any]) -> str:
    """The first tensor whose checkpoint shape differs from the config's, from a second load that
    tolerates it (transformers reports it then instead of raising)."""
    try:
        _, info = model_cls.from_pretrained(path, local_files_only=True, use_safetensors=True, output_loading_info=True,
                                            ignore_mismatched_sizes=True, **kwargs)
        bad = list(info.get("mismatched_keys") or [])
    except Exception:  # noqa: BLE001 - only a better message was at stake
        bad = []
    if not bad:
        return "their tensor shapes differ from what config.json builds"
    first = bad[0]
    if isinstance(first, (tuple, list)) and len(first) == 3:
        name, ckpt, model = first
        return f"{name}: {list(ckpt)} in the weights, {list(model)} for the config ({len(bad)} tensor(s) differ)"
    return f"{len(bad)} tensor(s) differ in shape, e.g. {first}"


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _weights_hash(files: list[Path]) -> tuple[str, str, int]:
    """(sha256, "full" | "sampled", total bytes) of the weight files."""
    total = sum(f.stat().st_size for f in files)
    h = hashlib.sha256()
    if total <= FULL_HASH_LIMIT:
        for f in files:
            h.update(f.name.encode() + b"\0")
            h.update(bytes.fromhex(_sha256_file(f)))
        return h.hexdigest(), "full", total
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.name}\0{size}\0".encode())
        with open(f, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            h.update(fh.read(n))  # the header: every tensor's name, dtype, shape and offsets
            data = size - 8 - n
            for i in range(SAMPLE_BLOCKS):
                fh.seek(8 + n + (data - SAMPLE_BLOCK_BYTES) * i // max(SAMPLE_BLOCKS - 1, 1) if data > SAMPLE_BLOCK_BYTES
                        else 8 + n)
                h.update(fh.read(SAMPLE_BLOCK_BYTES))
    return h.hexdigest(), "sampled", total


def _config_dict(config: Any) -> dict[str, Any]:
    d = config.to_dict() if hasattr(config, "to_dict") else dict(config)

    def clean(x: Any) -> Any:
        if isinstance(x, dict):
            return {k: clean(v) for k, v in x.items() if k not in _VOLATILE_CONFIG_KEYS}
        if isinstance(x, (list, tuple)):
            return [clean(v) for v in x]
        return x

    return clean(d)


def model_fingerprint(path: Path, config: Any, model_class: str) -> dict[str, Any]:
    """What identifies the model of a recording (stored as the root attribute ``model_fingerprint``).

    Returns:
        ``{"model_class", "config_sha256", "weights_sha256", "weights_hash": "full"|"sampled",
        "weights_bytes", "processing": {file name: sha256}}``; the config hash is over the config as JSON
        with sorted keys, without the keys that only say how it was saved (transformers version, path).
    """
    files = check_weights(path)
    weights, how, total = _weights_hash(files)
    cfg = json.dumps(_config_dict(config), sort_keys=True, default=str)
    processing = {name: _sha256_file(path / name) for name in _PROCESSING_FILES if (path / name).is_file()}
    return {"model_class": model_class, "config_sha256": hashlib.sha256(cfg.encode()).hexdigest(),
            "weights_sha256": weights, "weights_hash": how, "weights_bytes": total, "processing": processing}


def fingerprint_differences(stored: dict[str, Any], now: dict[str, Any], stored_config: dict[str, Any] | None = None,
                            config: Any = None) -> list[str]:
    """Readable differences between two fingerprints (empty when they identify the same model)."""
    out = []
    if stored.get("model_class") != now.get("model_class"):
        out.append(f"model class {stored.get('model_class')} vs {now.get('model_class')}")
    if stored.get("config_sha256") != now.get("config_sha256"):
        keys = []
        if stored_config is not None and config is not None:
            a, b = _config_dict(stored_config), _config_dict(config)
            keys = [k for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)][:4]
        out.append("the config" + (f" ({', '.join(f'{k}: {_short(a.get(k))} vs {_short(b.get(k))}' for k in keys)})"
                                   if keys else ""))
    if stored.get("weights_sha256") != now.get("weights_sha256"):
        out.append(f"the weights (sha256 {str(stored.get('weights_sha256'))[:12]}... vs "
                   f"{str(now.get('weights_sha256'))[:12]}...)")
    sp, np_ = stored.get("processing", {}) or {}, now.get("processing", {}) or {}
    changed = sorted(k for k in set(sp) | set(np_) if sp.get(k) != np_.get(k))
    if changed:
        out.append(f"the processing files ({', '.join(changed)})")
    return out


def _short(v: Any) -> str:
    text = json.dumps(v, default=str)
    return text if len(text) <= 24 else text[:21] + "..."


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__)[:300]
