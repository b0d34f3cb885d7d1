"""The ``s2t`` adapter: Whisper-style speech-to-text encoder-decoders (``WhisperForConditionalGeneration``).

Loading is local only (a ``save_pretrained`` directory or the local hub cache), safetensors only, eager
attention; the feature extractor (``preprocessor_config.json``) and the tokenizer come from the same folder.
Real checkpoints (tiny/base/small, ``.en`` and multilingual) and the demo model load the same way.

Per batch of clips (:meth:`WhisperAdapter.run`):

1. the audio is read with soundfile, mixed to mono, resampled to the feature extractor's rate
   (``scipy.signal.resample_poly``) and turned into log-mel features of the model's fixed window
   (``WhisperFeatureExtractor``; ``input_features [batch, mel, 2 * max_source_positions]``);
2. **decode**: ``model.generate`` (greedy; ``beam`` > 1: beam search), which builds the prompt itself
   (start token; for multilingual checkpoints the language, detected or given, and the task;
   ``<|notimestamps|>``), up to ``max_new_tokens`` new tokens;
3. **one teacher-forced pass** with ``output_attentions=True`` over ``[y_0, ..., y_{n-1}]`` (the whole
   sequence but its last token): row ``t`` of every decoder map is the step that predicts ``y_{t+1}``. Prompt
   tokens (language, task) are rows like any other and are marked in ``samples/meta``. Recorded, cropped to
   the frames that hold audio (``E = ceil(F / 2)`` encoder frames for ``F = ceil(samples / hop)`` feature
   frames) and zero-padded to the longest clip:

   - ``cross``: ``[batch, decoder_layer, head, token, encoder_frame]`` (the main stack);
   - ``self``: encoder self-attention ``[batch, encoder_layer, head, encoder_frame, encoder_frame]``;
   - ``decoder_self``: ``[batch, decoder_layer, head, token, token]``.

   Cropping drops the attention a row puts on the padding frames of the window, so a cropped row sums to
   at most 1 (``1 -`` its sum is the mass on padding).

Attributions (``extractor.attributions``, input kind "audio") explain each row's token under forced decoding;
deletion curves (:mod:`extractor.deletion`) are added when ``deletion_steps`` > 0. Decisions, units and the
per-sample ``meta`` keys: ``docs/speech.md``.
"""

from __future__ import annotations

import contextlib
import json
import math
import string
import zlib
from dataclasses import dataclass, field, fields
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import torch

from attnviz.errors import InputError, ModelError
from attnviz.store.schema import AttributionSpec, PerSampleSpec, StackSpec, TokenLayout
from extractor.adapters.base import (
    Adapter,
    ArchitectureSpec,
    BatchOutput,
    ModelSource,
    PreparedBatch,
    register_adapter,
)
from extractor.audio import AudioInput, read_audio
from extractor.device import autocast

__all__ = ["WhisperAdapter", "S2TOptions", "AudioBatch", "KINDS", "ENVELOPE_SECONDS", "TOKEN_TARGET",
           "DISTRIBUTION_TARGET", "parse_heads"]

#: attention kinds a recording may hold; "cross" (the main stack) is always recorded
KINDS = ("cross", "self", "decoder_self")
#: bin width of the stored waveform envelope (min and max per bin)
ENVELOPE_SECONDS = 0.005
_LAYOUTS = {"cross": TokenLayout(query_axis="tokens", key_axis="frames"),
            "self": TokenLayout(query_axis="frames", key_axis="frames"),
            "decoder_self": TokenLayout(query_axis="tokens", key_axis="tokens")}


@dataclass(frozen=True)
class _SpeechTarget:
    """What the s2t attributions explain (the family's ``--target``; only "auto")."""

    name: str
    classifier: bool
    definition: str
    zero_gradient: bool = False


TOKEN_TARGET = _SpeechTarget("token_logprob", False,
                             "log p(y_t+1 | y_<=t, X): log-probability of each recorded token under forced decoding")
DISTRIBUTION_TARGET = "token_distribution"  # the perturbation methods: KL of each row's next-token distribution


def parse_heads(value: Any, what: str = "--alignment-heads") -> tuple[tuple[int, int], ...] | None:
    """``"1:0,1:2"``, ``[[1, 0], [1, 2]]`` or None -> ((layer, head), ...) or None."""
    if value is None or value == "" or value == []:
        return None
    pairs: list[Any]
    if isinstance(value, str):
        pairs = [p.strip().split(":") for p in value.split(",") if p.strip()]
    else:
        pairs = list(value)
    out = []
    for p in pairs:
        try:
            layer, head = (int(v) for v in p)
        except (TypeError, ValueError):
            raise InputError(f"{what}: cannot read {value!r}; give decoder layer:head pairs like 1:0,1:2") from None
        if layer < 0 or head < 0:
            raise InputError(f"{what}: layers and heads are 0-based, got {layer}:{head}")
        out.append((layer, head))
    if not out:
        raise InputError(f"{what}: cannot read {value!r}; give decoder layer:head pairs like 1:0,1:2")
    return tuple(dict.fromkeys(out))


@dataclass(frozen=True)
class S2TOptions:
    """The family options of ``attnviz extract`` for a speech model (``ExtractOptions.family_options``).

    Attributes:
        beam: beams of the decoding search (1 = greedy).
        max_new_tokens: tokens generated after the prompt (eos included); None = Whisper's own budget,
            half the decoder's context per full window (``max_target_positions // 2``), scaled to the longest
            clip's share of the window, at least 8, at most what the decoder's context leaves.
        language / task: for multilingual checkpoints: the language (e.g. "en", "german") and task
            ("transcribe", "translate") of the prompt; None = the model detects the language and the generation
            config's task (or transcribe) applies.
        stacks: attention kinds to record ("cross" always; "self" = encoder, "decoder_self").
        n_masks / mask_batch: perturbation saliency: masks per clip and masked copies per forward.
        gradient_method / ig_steps: gradient saliency: "saliency", "input_x_gradient" or "integrated_gradients",
            and integrated gradients' path points.
        deletion_steps: deletion curves with fractions 0, 1/N, ..., 1 of the frames removed (0 = none).
        alignment_heads: decoder (layer, head) pairs whose cross-attention times the words (DTW in
            ``attnviz analyze``); None = the model's ``alignment_heads``, else the best by CA-vs-saliency.
        seed: seeds the perturbation masks and the random deletion control.
    """

    beam: int = 1
    max_new_tokens: int | None = None
    language: str | None = None
    task: str | None = None
    stacks: tuple[str, ...] = KINDS
    n_masks: int = 128
    mask_batch: int = 16
    gradient_method: str = "saliency"
    ig_steps: int = 16
    deletion_steps: int = 0
    alignment_heads: tuple[tuple[int, int], ...] | None = None
    seed: int = 0

    @classmethod
    def parse(cls, options: dict[str, Any]) -> S2TOptions:
        """Options from ``family_options`` (CLI values or Python values); InputError naming the flag."""
        from extractor.attributions.gradient import GRADIENT_METHODS

        if "image_size" in options:
            raise InputError("--image-size does not apply to a speech model (it sets the input size of image models)")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(options) - known)
        if unknown:
            raise InputError(f"option(s) {', '.join(unknown)} do not apply to a speech (s2t) model; it takes "
                             f"{', '.join(sorted(known))}")
        kw: dict[str, Any] = {}
        for name in ("beam", "max_new_tokens", "n_masks", "mask_batch", "ig_steps", "deletion_steps", "seed"):
            if options.get(name) is not None:
                try:
                    kw[name] = int(options[name])
                except (TypeError, ValueError):
                    raise InputError(f"--{name.replace('_', '-')} must be an integer, got {options[name]!r}") from None
        for name, low in (("beam", 1), ("max_new_tokens", 1), ("n_masks", 1), ("mask_batch", 1), ("ig_steps", 1),
                          ("deletion_steps", 0)):
            if name in kw and kw[name] < low:
                raise InputError(f"--{name.replace('_', '-')} must be at least {low}, got {kw[name]}")
        for name in ("language", "task", "gradient_method"):
            if options.get(name) is not None:
                kw[name] = str(options[name]).strip()
        if kw.get("gradient_method") is not None and kw["gradient_method"] not in GRADIENT_METHODS:
            raise InputError(f"--gradient-method must be one of {', '.join(GRADIENT_METHODS)}, got {kw['gradient_method']!r}")
        if kw.get("task") is not None and kw["task"] not in ("transcribe", "translate"):
            raise InputError(f"--task must be transcribe or translate, got {kw['task']!r}")
        if options.get("stacks") is not None:
            raw = options["stacks"]
            names = [s.strip() for s in (raw.split(",") if isinstance(raw, str) else raw) if str(s).strip()]
            bad = [s for s in names if s not in KINDS]
            if bad:
                raise InputError(f"--stacks: unknown attention kind(s) {', '.join(bad)}; choose from {', '.join(KINDS)}")
            kw["stacks"] = tuple(k for k in KINDS if k in names or k == "cross")
        if options.get("alignment_heads") is not None:
            kw["alignment_heads"] = parse_heads(options["alignment_heads"])
        return cls(**kw)


@dataclass
class AudioBatch(PreparedBatch):
    """A prepared batch of clips (CPU), filled further by :meth:`WhisperAdapter.run`.

    Attributes:
        items: the clips.
        n_samples: int ``[batch]``: waveform samples at the model's rate.
        n_frames: int ``[batch]``: feature frames that hold audio (F).
        n_encoder_frames: int ``[batch]``: encoder frames that hold audio (E).
        envelopes: float ``[batch, 2, bins]``: min and max of the waveform per ``ENVELOPE_SECONDS`` bin.
        sequences: per clip, the recorded token ids ``y_0..y_n`` (set by ``run``).
        prompt_length: tokens of the prompt, start token included (set by ``run``).
    """

    items: tuple[AudioInput, ...] = ()
    n_samples: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    n_frames: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    n_encoder_frames: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64))
    envelopes: np.ndarray | None = None
    sequences: list[list[int]] = field(default_factory=list)
    prompt_length: int = 1


class _PromptLength:
    """A logits processor that only notes the prompt's length (the input length at the first step):
    ``generate`` builds Whisper's prompt itself and returns it joined to the generated tokens."""

    def __init__(self) -> None:
        self.length: int | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if self.length is None:
            self.length = int(input_ids.shape[-1])
        return scores


@contextlib.contextmanager
def _quiet_transformers() -> Iterator[None]:
    """transformers 5 logs deprecation notices and notes on every Whisper ``generate`` (suppress_tokens,
    max_new_tokens vs max_length, language detection); they say nothing to an attnviz user."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


@register_adapter
class WhisperAdapter(Adapter):
    """Adapter for Whisper-style encoder-decoders (see the module docstring)."""

    name = "s2t"
    input_kind = "audio"
    input_noun = "clip"
    writes_meta = True
    supports_qk = False
    default_attributions = ("gradient",)
    thumbnail_size = None

    def __init__(self, *, feature_extractor: Any, tokenizer: Any, options: S2TOptions, **kw: Any) -> None:
        super().__init__(**kw)
        self.feature_extractor = feature_extractor
        self.tokenizer = tokenizer
        self.options = options
        fe = feature_extractor
        self.sample_rate = int(fe.sampling_rate)
        self.hop = int(fe.hop_length)
        self.n_mel = int(fe.feature_size)
        self.window_frames = int(fe.nb_max_frames)
        self.window_seconds = int(fe.n_samples) / self.sample_rate
        cfg = self.config
        self.n_encoder_window = int(cfg.max_source_positions)
        if self.window_frames != 2 * self.n_encoder_window:
            raise ModelError(f"{self.source.ref}: the feature extractor makes {self.window_frames} frames per window, "
                             f"but the model takes 2 x max_source_positions = {2 * self.n_encoder_window}")
        gen = self.model.generation_config
        self.eos_id = int(gen.eos_token_id if gen.eos_token_id is not None else cfg.eos_token_id)
        self.pad_id = int(gen.pad_token_id if gen.pad_token_id is not None else cfg.pad_token_id)
        self.model_alignment_heads = parse_heads(getattr(gen, "alignment_heads", None), "generation_config alignment_heads")
        specials = set(int(i) for i in getattr(tokenizer, "all_special_ids", []) or [])
        specials |= {self.eos_id, int(cfg.decoder_start_token_id)}
        no_ts = getattr(gen, "no_timestamps_token_id", None)
        if no_ts is not None:  # the timestamp tokens <|0.00|>... follow <|notimestamps|>
            specials |= set(range(int(no_ts), int(cfg.vocab_size)))
        specials |= set(int(v) for v in (getattr(gen, "lang_to_id", None) or {}).values())
        specials |= set(int(v) for v in (getattr(gen, "task_to_id", None) or {}).values())
        self.special_ids = frozenset(specials)
        self.prompt_max = self._prompt_bound()
        # sized by plan(); until then, the whole window
        self.max_samples = int(fe.n_samples)
        self.max_duration = self.window_seconds
        self.max_frames, self.max_encoder_frames = self.frames_of(self.max_samples)
        self.max_new_tokens = self._token_budget(self.window_seconds)
        self.methods: list[str] = []

    # -- loading -----------------------------------------------------------------------------

    @classmethod
    def collect_options(cls, source: ModelSource, config: Any, arch: ArchitectureSpec) -> dict[str, Any]:  # noqa: ARG003
        """The feature extractor's rate and window, read from ``preprocessor_config.json`` (no model loaded)."""
        fe = _read_preprocessor(source)
        rate = int(fe.get("sampling_rate", 16000))
        n_samples = fe.get("n_samples") or int(fe.get("chunk_length", 30)) * rate
        return {"sample_rate": rate, "max_seconds": int(n_samples) / rate}

    @classmethod
    def load(cls, source: ModelSource, config: Any, arch: ArchitectureSpec, *, device: torch.device,
             autocast_dtype: torch.dtype | None, **options: Any) -> WhisperAdapter:
        """Load the model, its feature extractor and its tokenizer (options: :class:`S2TOptions`)."""
        import transformers

        from extractor.loading import load_pretrained

        opts = S2TOptions.parse(options)
        _read_preprocessor(source)
        model = load_pretrained(getattr(transformers, arch.model_class), source.path, source.ref,
                                attn_implementation="eager")
        model.eval().to(device)
        try:
            fe = transformers.AutoFeatureExtractor.from_pretrained(source.path, local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise ModelError(f"{source.ref}: cannot load the feature extractor ({_first_line(e)})") from None
        for attr in ("sampling_rate", "hop_length", "n_samples", "nb_max_frames", "feature_size"):
            if not hasattr(fe, attr):
                raise ModelError(f"{source.ref}: the feature extractor {type(fe).__name__} has no {attr}; attnviz "
                                 "needs a WhisperFeatureExtractor")
        try:
            tokenizer = transformers.AutoTokenizer.from_pretrained(source.path, local_files_only=True)
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise ModelError(f"{source.ref}: cannot load the tokenizer ({_first_line(e)}); save it into the model "
                             "folder (e.g. WhisperProcessor.save_pretrained)") from None
        # transformers builds an empty WhisperTokenizer from a folder without tokenizer files: refuse it
        if len(tokenizer) < 0.9 * int(config.vocab_size):
            raise ModelError(f"{source.ref}: cannot load the tokenizer (it has {len(tokenizer)} tokens, the model "
                             f"{config.vocab_size}); save it into the model folder (e.g. WhisperProcessor.save_pretrained)")
        adapter = cls(model=model, config=config, arch=arch, source=source, device=device,
                      autocast_dtype=autocast_dtype, feature_extractor=fe, tokenizer=tokenizer, options=opts)
        adapter._check_options()
        return adapter

    def _check_options(self) -> None:
        o, gen = self.options, self.model.generation_config
        n_layers, n_heads = self._stack_shape("cross")
        for layer, head in o.alignment_heads or ():
            if layer >= n_layers or head >= n_heads:
                raise InputError(f"--alignment-heads: {layer}:{head} is not a decoder head of this model "
                                 f"({n_layers} layers x {n_heads} heads)")
        multilingual = bool(getattr(gen, "is_multilingual", False)) or bool(getattr(gen, "lang_to_id", None))
        if (o.language or o.task) and not multilingual:
            raise InputError(f"--language/--task apply to multilingual checkpoints; {self.source.ref} is "
                             "English-only (its generation config has no languages)")
        if o.language:
            lang = o.language.lower()
            codes = getattr(gen, "lang_to_id", None) or {}
            from transformers.models.whisper.tokenization_whisper import TO_LANGUAGE_CODE

            token = f"<|{TO_LANGUAGE_CODE.get(lang, lang)}|>"
            if lang not in codes and token not in codes:
                raise InputError(f"--language {o.language}: not a language of this model "
                                 f"({', '.join(sorted(codes))[:200]})")
        if o.max_new_tokens is not None and self.prompt_max + o.max_new_tokens > int(self.config.max_target_positions):
            raise InputError(f"--max-new-tokens {o.max_new_tokens}: the prompt (up to {self.prompt_max} tokens) and "
                             f"the new tokens must fit the decoder's {self.config.max_target_positions} positions")

    # -- description -------------------------------------------------------------------------

    @property
    def has_classifier(self) -> bool:
        return False

    def _stack_shape(self, kind: str) -> tuple[int, int]:
        cfg = self.config
        if kind == "self":
            return int(cfg.encoder_layers), int(cfg.encoder_attention_heads)
        return int(cfg.decoder_layers), int(cfg.decoder_attention_heads)

    def _prompt_bound(self) -> int:
        """The longest prompt ``generate`` can build: start, forced ids, language, task, <|notimestamps|>."""
        gen = self.model.generation_config
        forced = len(getattr(gen, "forced_decoder_ids", None) or [])
        no_timestamps = getattr(gen, "no_timestamps_token_id", None) is not None
        return 1 + max(forced, 2 if getattr(gen, "lang_to_id", None) else 0) + int(no_timestamps)

    def _token_budget(self, seconds: float) -> int:
        if self.options.max_new_tokens is not None:
            return int(self.options.max_new_tokens)
        context = int(self.config.max_target_positions)
        whisper = math.ceil(context / 2 * min(1.0, seconds / self.window_seconds))
        return max(1, min(context - self.prompt_max, max(8, whisper)))

    @property
    def max_rows(self) -> int:
        """Token rows of the longest possible sequence: prompt + new tokens, minus the last token."""
        return self.prompt_max + self.max_new_tokens - 1

    def frames_of(self, n_samples: int) -> tuple[int, int]:
        """(feature frames F, encoder frames E) that hold audio for a clip of ``n_samples`` at the model's rate."""
        f = min(self.window_frames, max(1, math.ceil(n_samples / self.hop)))
        return f, math.ceil(f / 2)

    def plan(self, items: Sequence[AudioInput]) -> None:
        """Size the stacks from the longest clip and the token budget."""
        longest = max(_samples_at(it, self.sample_rate) for it in items)
        self.max_duration = longest / self.sample_rate
        self.max_samples = longest
        self.max_frames, self.max_encoder_frames = self.frames_of(longest)
        self.max_new_tokens = self._token_budget(self.max_duration)

    def stacks(self) -> list[StackSpec]:
        t, e = self.max_rows, self.max_encoder_frames
        sizes = {"cross": (t, e), "self": (e, e), "decoder_self": (t, t)}
        return [StackSpec(kind, *self._stack_shape(kind), *sizes[kind], _LAYOUTS[kind])
                for kind in KINDS if kind in self.options.stacks]

    def per_sample_specs(self) -> list[PerSampleSpec]:
        bins = math.ceil(self.max_samples / self._envelope_hop)
        specs = [
            PerSampleSpec("log_mel", (self.n_mel, self.max_frames), "float16", ("mel", "frame"),
                          f"the model's input features (log-mel, as the feature extractor normalises them) of the "
                          f"frames that hold audio; frame j covers [{self.hop / self.sample_rate:g} j, "
                          f"{self.hop / self.sample_rate:g} (j+1)) s"),
            PerSampleSpec("waveform_envelope", (2, bins), "float16", ("bound", "bin"),
                          f"min (row 0) and max (row 1) of the waveform at {self.sample_rate} Hz per "
                          f"{ENVELOPE_SECONDS * 1000:g} ms bin"),
        ]
        if self.options.deletion_steps:
            specs.append(PerSampleSpec("deletion", (len(self.deletion_explanations()), self.options.deletion_steps + 1,
                                                    self.max_rows), "float32", ("explanation", "fraction", "token"),
                                       "log p(token) under forced decoding after deleting the top fraction of encoder "
                                       "frames of each explanation (names and fractions: extraction_params.family)"))
        return specs

    @property
    def _envelope_hop(self) -> int:
        return max(1, round(ENVELOPE_SECONDS * self.sample_rate))

    def extra_params(self) -> dict[str, Any]:
        from extractor.deletion import deletion_fractions

        o = self.options
        out: dict[str, Any] = {
            "sample_rate": self.sample_rate, "hop_length": self.hop, "n_mel": self.n_mel,
            "feature_frame_seconds": self.hop / self.sample_rate,
            "encoder_frame_seconds": 2 * self.hop / self.sample_rate,
            "window_seconds": self.window_seconds, "max_new_tokens": self.max_new_tokens, "beam": o.beam,
            "language": o.language, "task": o.task, "stacks": list(o.stacks),
            "alignment_heads": [list(h) for h in o.alignment_heads] if o.alignment_heads else None,
            "model_alignment_heads": [list(h) for h in self.model_alignment_heads] if self.model_alignment_heads else None,
            "envelope_seconds": ENVELOPE_SECONDS,
        }
        if o.deletion_steps:
            out["deletion"] = {"explanations": self.deletion_explanations(),
                               "fractions": deletion_fractions(o.deletion_steps).tolist(),
                               "unit": "encoder frames (each zeroes two feature frames)"}
        return out

    def deletion_explanations(self) -> list[str]:
        """Names of the explanations whose deletion curves are recorded, in the order of ``per_sample/deletion``:
        the all-layer cross-attention mean, each layer's head mean, each attribution, and a random order."""
        n_layers, _ = self._stack_shape("cross")
        return ["ca_mean", *(f"ca_layer{layer}" for layer in range(n_layers)), *self.methods, "random"]

    # -- per batch ---------------------------------------------------------------------------

    def prepare(self, items: Sequence[AudioInput]) -> AudioBatch:
        """Read, resample and featurise a batch of clips (CPU; no model access).

        Returns:
            ``inputs["input_features"]`` float32 ``[batch, mel, window_frames]`` and the per-clip sizes.
        """
        waves = []
        for it in items:
            try:
                waves.append(read_audio(it.path, self.sample_rate)[0])
            except Exception as e:
                raise InputError(f"{it.id} could be read when the run started but not now ({e}); "
                                 "did the input change?") from None
        feats = self.feature_extractor(waves, sampling_rate=self.sample_rate, return_tensors="pt")["input_features"]
        if tuple(feats.shape[1:]) != (self.n_mel, self.window_frames):
            raise ModelError(f"the feature extractor made {tuple(feats.shape[1:])} features, expected "
                             f"{(self.n_mel, self.window_frames)}")
        n = np.array([len(w) for w in waves], np.int64)
        frames = np.array([self.frames_of(int(k)) for k in n], np.int64)
        hop = self._envelope_hop
        bins = max(math.ceil(int(k) / hop) for k in n)
        env = np.zeros((len(waves), 2, bins), np.float32)
        for j, w in enumerate(waves):
            nb = math.ceil(len(w) / hop)
            padded = np.zeros(nb * hop, np.float32)
            padded[:len(w)] = w
            env[j, 0, :nb] = padded.reshape(nb, hop).min(1)
            env[j, 1, :nb] = padded.reshape(nb, hop).max(1)
        return AudioBatch(inputs={"input_features": feats.float()}, labels=np.full(len(items), -1, np.int32),
                          items=tuple(items), n_samples=n, n_frames=frames[:, 0], n_encoder_frames=frames[:, 1],
                          envelopes=env)

    def _generate(self, features: torch.Tensor) -> tuple[list[list[int]], int, list[bool]]:
        """Decode a batch: (each clip's token ids y_0..y_n, prompt length, truncated flags)."""
        from transformers import LogitsProcessorList

        o = self.options
        kw: dict[str, Any] = {"num_beams": o.beam} if o.beam > 1 else {}
        if o.language:
            kw["language"] = o.language
        if o.task:
            kw["task"] = o.task
        probe = _PromptLength()
        with _quiet_transformers(), autocast(self.device, self.autocast_dtype):
            out = self.model.generate(features, return_dict_in_generate=True, max_new_tokens=self.max_new_tokens,
                                      logits_processor=LogitsProcessorList([probe]), **kw)
        seqs = out.sequences.cpu().numpy()
        prompt = int(probe.length or 1)
        result, truncated = [], []
        for row in seqs:
            ends = np.flatnonzero(row[prompt:] == self.eos_id)
            length = prompt + int(ends[0]) + 1 if ends.size else len(row)
            result.append([int(v) for v in row[:length]])
            truncated.append(not ends.size)
        return result, prompt, truncated

    def run(self, batch: AudioBatch) -> BatchOutput:
        """Decode, then one teacher-forced pass with attention outputs (caller holds ``torch.no_grad()``)."""
        x = batch.inputs["input_features"].to(self.device, non_blocking=True)
        seqs, prompt, truncated = self._generate(x)
        batch.sequences, batch.prompt_length = seqs, prompt
        b = len(seqs)
        rows = np.array([len(s) - 1 for s in seqs], np.int64)
        if rows.max() > self.max_rows:
            raise ModelError(f"decoding made {rows.max()} rows, more than the {self.max_rows} the file holds "
                             f"(prompt of {prompt} tokens, {self.max_new_tokens} new)")
        t = int(rows.max())
        dec_in = torch.full((b, t), self.pad_id, dtype=torch.long)
        for j, s in enumerate(seqs):
            dec_in[j, :len(s) - 1] = torch.as_tensor(s[:-1])
        dec_in = dec_in.to(self.device)
        with autocast(self.device, self.autocast_dtype):
            out = self.model(input_features=x, decoder_input_ids=dec_in, output_attentions=True, use_cache=False)
        if not out.cross_attentions:
            raise ModelError(f"{self.model_class} returned no attention weights (is eager attention set?)")
        e_max = int(batch.n_encoder_frames.max())
        enc = torch.as_tensor(batch.n_encoder_frames, device=self.device)
        tok = torch.as_tensor(rows, device=self.device)
        sources = {"cross": (out.cross_attentions, tok, enc, t, e_max),
                   "self": (out.encoder_attentions, enc, enc, e_max, e_max),
                   "decoder_self": (out.decoder_attentions, tok, tok, t, t)}
        attention, lengths = {}, {}
        for kind in self.options.stacks:
            maps, q_len, k_len, q_max, k_max = sources[kind]
            stack = torch.stack([a[:, :, :q_max, :k_max] for a in maps], 1).to(torch.float16)  # [b, L, H, q, k]
            valid = ((torch.arange(q_max, device=self.device)[None, :] < q_len[:, None])[:, None, None, :, None]
                     & (torch.arange(k_max, device=self.device)[None, :] < k_len[:, None])[:, None, None, None, :])
            attention[kind] = stack * valid  # the padding MUST be zero (file format)
            lengths[kind] = np.stack([q_len.cpu().numpy(), k_len.cpu().numpy()], 1).astype(np.int32)
        logp = out.logits.float().log_softmax(-1)
        targets = torch.full((b, t), 0, dtype=torch.long, device=self.device)
        for j, s in enumerate(seqs):
            targets[j, :len(s) - 1] = torch.as_tensor(s[1:], device=self.device)
        token_logp = logp.gather(-1, targets[..., None])[..., 0].cpu().numpy()
        f_max = int(batch.n_frames.max())
        log_mel = x[:, :, :f_max].float().cpu().numpy().copy()
        for j in range(b):
            log_mel[j, :, int(batch.n_frames[j]):] = 0
        meta = [self._meta(batch, j, seqs[j], prompt, token_logp[j, :rows[j]], truncated[j]) for j in range(b)]
        return BatchOutput(attention=attention, logits=None, lengths=lengths, predictions=np.full(b, -1, np.int32),
                           meta=meta, per_sample={"log_mel": log_mel.astype(np.float16),
                                                  "waveform_envelope": batch.envelopes.astype(np.float16)})

    def _meta(self, batch: AudioBatch, j: int, seq: list[int], prompt: int, token_logp: np.ndarray,
              truncated: bool) -> dict[str, Any]:
        """``samples/meta`` of one clip (keys: docs/speech.md)."""
        it = batch.items[j]
        tokens = seq[1:]
        special = [int(i) in self.special_ids for i in tokens]
        text_rows = [r for r, s in enumerate(special) if not s and r >= prompt - 1]
        meta: dict[str, Any] = {
            "duration": int(batch.n_samples[j]) / self.sample_rate,
            "source_sample_rate": int(it.source_rate),
            "n_feature_frames": int(batch.n_frames[j]), "n_encoder_frames": int(batch.n_encoder_frames[j]),
            "decoder_start": self._piece(seq[0]),
            "token_ids": [int(i) for i in tokens],
            "tokens": [self._piece(i) for i in tokens],
            "prompt_rows": prompt - 1,
            "special": special,
            "logprob": [round(float(v), 6) for v in token_logp],
            "text": self.tokenizer.decode([tokens[r] for r in text_rows], skip_special_tokens=True).strip(),
            "words": _group_words(self.tokenizer, [tokens[r] for r in text_rows], text_rows),
            "truncated": bool(truncated),
        }
        if it.text is not None:
            meta["reference"] = it.text
        if it.words is not None:
            meta["reference_words"] = [{"word": w.word, "start": w.start, "end": w.end} for w in it.words]
        return meta

    def _piece(self, token_id: int) -> str:
        return self.tokenizer.decode([int(token_id)], skip_special_tokens=False)

    # -- attributions ------------------------------------------------------------------------

    @classmethod
    def resolve_target(cls, name: str, arch: ArchitectureSpec) -> Any:
        if name != "auto":
            raise InputError(f"--target {name}: a speech model's attributions explain each token under forced "
                             f"decoding ({TOKEN_TARGET.definition}); leave --target at auto")
        return TOKEN_TARGET

    def attribution_specs(self, methods: Sequence[str], target: Any) -> list[AttributionSpec]:
        from extractor import attributions as A

        self.methods = list(methods)
        specs = []
        for m in methods:
            method = A.get(m)
            shape = ((self.max_rows, self.max_frames, self.n_mel) if method.resolution == "spectrogram"
                     else (self.max_rows, self.max_encoder_frames))
            tgt = TOKEN_TARGET.name if method.needs_grad else DISTRIBUTION_TARGET
            specs.append(AttributionSpec(m, shape, method.resolution, tgt, method.describe(**self._params(m)),
                                         dtype="float16"))
        return specs

    def _params(self, method: str) -> dict[str, Any]:
        o = self.options
        if method == "gradient":
            return {"method": o.gradient_method, "n_steps": o.ig_steps}
        return {"n_masks": o.n_masks, "batch_size": o.mask_batch if method == "perturbation" else 2 * o.mask_batch,
                "seed": o.seed}

    def decoding(self, batch: AudioBatch, j: int) -> Any:
        """Clip ``j`` of a run batch under forced decoding (:class:`extractor.attributions.speech.ForcedDecoding`)."""
        from extractor.attributions.speech import ForcedDecoding

        seq = torch.as_tensor(batch.sequences[j], device=self.device)
        x = batch.inputs["input_features"][j:j + 1].to(self.device)
        return ForcedDecoding(self.model, x, seq[:-1].view(1, -1), seq[1:], int(batch.n_frames[j]),
                              int(batch.n_encoder_frames[j]), self.autocast_dtype)

    def attribute(self, methods: Sequence[str], batch: AudioBatch, out: BatchOutput, target: Any,
                  predictions: np.ndarray) -> dict[str, np.ndarray]:
        """Every method on every clip (float16 ``[batch, token, frame, mel]`` or ``[batch, token, encoder_frame]``,
        zero-padded); with ``deletion_steps`` also the deletion curves, added to ``out.per_sample["deletion"]``
        (they rank frames by the attributions just computed)."""
        from attnviz.analysis.crossattn import pool_frames, reduce_frequency
        from extractor.attributions.speech import compute_speech
        from extractor.deletion import deletion_curves

        b = len(batch.sequences)
        results: dict[str, list[np.ndarray]] = {m: [] for m in methods}
        curves = []
        cross = out.attention["cross"]
        for j in range(b):
            dec = self.decoding(batch, j)
            for m in methods:
                results[m].append(compute_speech(m, dec, **self._params(m)))
            if self.options.deletion_steps:
                t, e = dec.n_rows, dec.n_encoder_frames
                ca = cross[j, :, :, :t, :e].float().cpu().numpy()  # [L, H, T, E]
                expl: dict[str, np.ndarray] = {"ca_mean": ca.mean((0, 1))}
                for layer in range(ca.shape[0]):
                    expl[f"ca_layer{layer}"] = ca[layer].mean(0)
                for m in methods:
                    r = results[m][-1]
                    expl[m] = r if r.ndim == 2 else pool_frames(reduce_frequency(r), "mean")[:, :e]
                # seeded by the clip's id: a resumed run draws the same order
                seed = [self.options.seed, zlib.crc32(batch.items[j].id.encode("utf-8"))]
                expl["random"] = np.random.default_rng(seed).random((t, e))
                curves.append(deletion_curves(dec, expl, self.options.deletion_steps, batch_size=2 * self.options.mask_batch))
        if curves:
            n_expl, n_steps = curves[0].shape[:2]
            arr = np.zeros((b, n_expl, n_steps, max(c.shape[2] for c in curves)), np.float32)
            for j, c in enumerate(curves):
                arr[j, :, :, :c.shape[2]] = c
            out.per_sample["deletion"] = arr
        return {m: _stack_padded(v).astype(np.float16) for m, v in results.items()}

    def logits_fn(self) -> Callable[[Any], Any]:
        raise ModelError(f"{self.model_class} generates text; it has no class logits (its attributions explain "
                         "each token's log-probability)")


def _stack_padded(arrays: list[np.ndarray]) -> np.ndarray:
    """Arrays of equal rank and different sizes -> one zero-padded array ``[n, *max_shape]``."""
    shape = tuple(max(a.shape[i] for a in arrays) for i in range(arrays[0].ndim))
    out = np.zeros((len(arrays), *shape), arrays[0].dtype)
    for j, a in enumerate(arrays):
        out[(j, *(slice(0, s) for s in a.shape))] = a
    return out


def _group_words(tokenizer: Any, ids: list[int], rows: list[int]) -> list[dict[str, Any]]:
    """Group text tokens into words as decoded text shows them: a token whose decoded piece starts with
    whitespace starts a word; a piece of punctuation only joins the word before it (as Whisper's timing code
    merges punctuation); otherwise it continues the current word.

    Returns:
        ``[{"word": str, "rows": [row, ...]}]`` with the rows of the tokens of each word.
    """
    words: list[dict[str, Any]] = []
    previous = ""
    for k, (tid, row) in enumerate(zip(ids, rows)):
        text = tokenizer.decode(ids[:k + 1], skip_special_tokens=True)
        piece = text[len(previous):] if text.startswith(previous) else tokenizer.decode([tid], skip_special_tokens=True)
        previous = text
        stripped = piece.strip()
        if not stripped:
            if words:
                words[-1]["rows"].append(row)
            continue
        if words and (all(c in string.punctuation for c in stripped) or not piece[:1].isspace()):
            words[-1]["word"] += stripped if not piece[:1].isspace() else " " + stripped
            words[-1]["rows"].append(row)
        else:
            words.append({"word": stripped, "rows": [row]})
    return words


def _samples_at(it: AudioInput, rate: int) -> int:
    """Samples of a clip at the model's rate, as ``resample_poly`` makes them (``ceil(n * up / down)``)."""
    n = round(it.duration * it.source_rate) if it.source_rate else round(it.duration * rate)
    if not it.source_rate or it.source_rate == rate:
        return int(n)
    g = math.gcd(int(it.source_rate), int(rate))
    return int(math.ceil(n * (rate // g) / (int(it.source_rate) // g)))


def _read_preprocessor(source: ModelSource) -> dict[str, Any]:
    path = source.path / "preprocessor_config.json"
    if not path.is_file():
        raise ModelError(f"{source.ref} has no preprocessor_config.json (the feature extractor); save it into the "
                         "model folder, e.g. WhisperFeatureExtractor(...).save_pretrained(folder)")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise ModelError(f"{source.ref}: cannot read preprocessor_config.json ({_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
