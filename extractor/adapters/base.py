"""The adapter registry and the table of architecture facts.

An *adapter* knows, for one model family ("vit", "lvlm", later "s2t"), how to load a Hugging Face
model, turn inputs into model inputs, and run a batch so that it returns one attention stack per kind
(``[batch, layer, head, query_pos, key_pos]``) plus the logits. Adapters register themselves by name
(:func:`register_adapter`); the CLI takes its ``--family`` choices from :func:`available_adapters`.

*Architecture facts* (which transformers class, where its attention modules and projections are, which
prefix tokens precede the patches) are data: one :class:`ArchitectureSpec` row per model class in
:data:`ARCHITECTURES`. Supporting another ViT-like classifier is one more row, not another ``if``.

Nothing in this module imports torch or transformers at import time; :func:`load_model` does.
"""

from __future__ import annotations

import os
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, ClassVar, Sequence

import numpy as np

from attnviz.errors import AttnvizError, InputError, ModelError
from attnviz.store.schema import AttributionSpec, PerSampleSpec, StackSpec, TokenLayout

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = [
    "ARCHITECTURES",
    "OUTPUTS",
    "INTERPOLATIONS",
    "Adapter",
    "ArchitectureSpec",
    "BatchOutput",
    "ModelSource",
    "PreparedBatch",
    "StackModules",
    "architecture",
    "available_adapters",
    "detect",
    "class_names_of",
    "find_modules",
    "get_adapter",
    "load_config",
    "load_model",
    "register_adapter",
    "resolve_model",
    "supported_architectures",
]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HALF = (0.5, 0.5, 0.5)


# -- architecture facts (data) -----------------------------------------------------------------


@dataclass(frozen=True)
class StackModules:
    """Where one attention stack lives inside a model: module paths relative to one layer.

    Attributes:
        kind: the attention kind recorded from this stack ("self", "cross", "decoder_self", "vision").
        layers: regex of one layer's module path; group 1 is the 0-based layer index.
        attention: path of the attention module inside a layer.
        query / key / value: paths of the q/k/v projections inside a layer (``nn.Linear``,
            out_features = heads * head_dim, head h owns rows ``[h*d:(h+1)*d]``).
        output_projection: path of the output projection W_O inside a layer; its *input* is the
            concatenation of the heads' outputs, ``[batch, tokens, heads * head_dim]`` (the hook point
            for ablating, scaling and capturing heads).
    """

    kind: str
    layers: str
    attention: str = "attention"
    query: str = "attention.q_proj"
    key: str = "attention.k_proj"
    value: str = "attention.v_proj"
    output_projection: str = "attention.o_proj"

    def pattern(self, what: str) -> re.Pattern[str]:
        """Regex matching the full module path of ``what`` ("attention", "query", "key", "value",
        "output_projection") in every layer; group 1 is the layer index."""
        rel = getattr(self, what)
        return re.compile(rf"^{self.layers}\.{re.escape(rel)}$")


#: what a model's forward gives for an image (ArchitectureSpec.output): "logits" for a classifier; for a
#: backbone without a classification head, where its pooled image embedding is
OUTPUTS = ("logits", "cls_token", "pooler_output", "image_embeds", "mean_tokens", "generated")
#: how a model meets inputs at another resolution than its config's (ArchitectureSpec.interpolation)
INTERPOLATIONS = ("flag", "always", "none")


@dataclass(frozen=True)
class ArchitectureSpec:
    """Facts about one transformers model class.

    Attributes:
        model_class: the ``transformers`` class name (as in ``config.architectures``).
        model_type: ``config.model_type``.
        family: the adapter that handles it ("vit", "s2t").
        stacks: where each attention stack is (:class:`StackModules`).
        prefix_tokens: names of the tokens before the patches, in sequence order.
        register_tokens_from: config attribute holding a number of register tokens that follow
            ``prefix_tokens`` (named ``register_0``, ``register_1``, ...), or None.
        image_mean / image_std: normalisation used when the model directory has no
            ``preprocessor_config.json`` (the processor is then built from the config).
        default_for_type: this row is used for a config of ``model_type`` that names no architecture.
        vision_config: None when the config itself describes the vision tower (image_size, patch_size,
            layers, heads), else the attribute holding the tower's sub-config (``vision_config`` of a
            ``CLIPConfig``).
        output: "logits" for a classifier; for a backbone without a classification head, its pooled
            image embedding: "cls_token" (``last_hidden_state[:, 0]``, after the final norm),
            "pooler_output", "image_embeds" (a projection head), or "mean_tokens" (mean of
            ``last_hidden_state`` over the patch tokens); "generated" for a generative model (s2t,
            lvlm: its output is the text it generates, recorded per sample in ``samples/meta``).
        interpolation: inputs at another resolution than the config's: "flag" (the forward takes
            ``interpolate_pos_encoding=True``), "always" (the model interpolates by itself: DINOv2),
            "none" (refused).
    """

    model_class: str
    model_type: str
    family: str
    stacks: tuple[StackModules, ...]
    prefix_tokens: tuple[str, ...] = ()
    register_tokens_from: str | None = None
    image_mean: tuple[float, ...] = HALF
    image_std: tuple[float, ...] = HALF
    default_for_type: bool = False
    vision_config: str | None = None
    output: str = "logits"
    interpolation: str = "flag"

    def __post_init__(self) -> None:
        if self.output not in OUTPUTS:
            raise ValueError(f"{self.model_class}: output must be one of {OUTPUTS}, got {self.output!r}")
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"{self.model_class}: interpolation must be one of {INTERPOLATIONS}")

    @property
    def has_classifier(self) -> bool:
        """True for classifiers (logits over classes); False for backbones that output an embedding."""
        return self.output == "logits"

    def stack(self, kind: str) -> StackModules:
        for s in self.stacks:
            if s.kind == kind:
                return s
        raise KeyError(f"{self.model_class} has no {kind!r} attention stack")

    def vision(self, config: Any) -> Any:
        """The config that describes the vision tower: ``config`` or its ``vision_config`` sub-config."""
        return getattr(config, self.vision_config) if self.vision_config else config

    def prefix_names(self, config: Any) -> tuple[str, ...]:
        """All prefix tokens of a model with this ``config``: fixed ones, then registers."""
        vision = self.vision(config)
        n_reg = int(getattr(vision, self.register_tokens_from, 0) or 0) if self.register_tokens_from else 0
        return self.prefix_tokens + tuple(f"register_{i}" for i in range(n_reg))


# Layer paths, transformers 5 (checked with named_modules() on tiny models of every class; the tests
# do it again). Classifiers hold the backbone under a prefix; bare backbones have none.
_VIT_LAYERS = StackModules("self", r"vit\.layers\.(\d+)")
_VIT_BASE_LAYERS = StackModules("self", r"layers\.(\d+)")
_DEIT_LAYERS = StackModules("self", r"deit\.layers\.(\d+)")
_DINOV2_LAYERS = StackModules("self", r"dinov2\.encoder\.layer\.(\d+)")
_DINOV2_BASE_LAYERS = StackModules("self", r"encoder\.layer\.(\d+)")
_DINOV2_REG_LAYERS = StackModules("self", r"dinov2_with_registers\.encoder\.layer\.(\d+)")
# CLIP and SigLIP towers (and the towers of vision-language models): self_attn with out_proj; the
# classifiers and CLIPVisionModelWithProjection hold the tower as `vision_model`, the bare towers do not.
# SiglipVisionModel's attention-pooling head (`head.attention`) is not an encoder layer and never matches.
_CLIP_ATTENTION = dict(attention="self_attn", query="self_attn.q_proj", key="self_attn.k_proj",
                       value="self_attn.v_proj", output_projection="self_attn.out_proj")
_CLIP_LAYERS = StackModules("self", r"(?:vision_model\.)?encoder\.layers\.(\d+)", **_CLIP_ATTENTION)
# LLaVA: a Llama-style language model (self_attn with o_proj) and the tower (CLIP facts) under model.vision_tower
_LLAVA_LM_LAYERS = StackModules("self", r"model\.language_model\.layers\.(\d+)", attention="self_attn",
                                query="self_attn.q_proj", key="self_attn.k_proj", value="self_attn.v_proj",
                                output_projection="self_attn.o_proj")
_LLAVA_VISION_LAYERS = StackModules("vision", r"model\.vision_tower\.(?:vision_model\.)?encoder\.layers\.(\d+)",
                                    **_CLIP_ATTENTION)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)

_IMAGENET = dict(image_mean=IMAGENET_MEAN, image_std=IMAGENET_STD)
# Whisper (s2t): encoder self-attention, decoder self-attention and cross-attention (`encoder_attn`) per layer
_WHISPER_STACKS = (
    StackModules("cross", r"model\.decoder\.layers\.(\d+)", attention="encoder_attn", query="encoder_attn.q_proj",
                 key="encoder_attn.k_proj", value="encoder_attn.v_proj", output_projection="encoder_attn.out_proj"),
    StackModules("self", r"model\.encoder\.layers\.(\d+)", **_CLIP_ATTENTION),
    StackModules("decoder_self", r"model\.decoder\.layers\.(\d+)", **_CLIP_ATTENTION),
)

#: Every supported model class. transformers 5 module paths (checked with ``named_modules()``).
ARCHITECTURES: tuple[ArchitectureSpec, ...] = (
    # ViT
    ArchitectureSpec("ViTForImageClassification", "vit", "vit", (_VIT_LAYERS,), ("cls",), default_for_type=True),
    ArchitectureSpec("ViTModel", "vit", "vit", (_VIT_BASE_LAYERS,), ("cls",), output="cls_token"),
    # DeiT always prepends a distillation token after CLS (every class shares DeiTEmbeddings)
    ArchitectureSpec("DeiTForImageClassification", "deit", "vit", (_DEIT_LAYERS,), ("cls", "distillation"),
                     default_for_type=True, **_IMAGENET),
    ArchitectureSpec("DeiTForImageClassificationWithTeacher", "deit", "vit", (_DEIT_LAYERS,),
                     ("cls", "distillation"), **_IMAGENET),
    ArchitectureSpec("DeiTModel", "deit", "vit", (_VIT_BASE_LAYERS,), ("cls", "distillation"),
                     output="cls_token", **_IMAGENET),
    # DINOv2 interpolates its position embeddings for any input size by itself
    ArchitectureSpec("Dinov2ForImageClassification", "dinov2", "vit", (_DINOV2_LAYERS,), ("cls",),
                     interpolation="always", **_IMAGENET),
    ArchitectureSpec("Dinov2Model", "dinov2", "vit", (_DINOV2_BASE_LAYERS,), ("cls",), output="cls_token",
                     interpolation="always", default_for_type=True, **_IMAGENET),
    ArchitectureSpec("Dinov2WithRegistersForImageClassification", "dinov2_with_registers", "vit",
                     (_DINOV2_REG_LAYERS,), ("cls",), register_tokens_from="num_register_tokens",
                     interpolation="always", default_for_type=True, **_IMAGENET),
    ArchitectureSpec("Dinov2WithRegistersModel", "dinov2_with_registers", "vit", (_DINOV2_BASE_LAYERS,), ("cls",),
                     register_tokens_from="num_register_tokens", output="cls_token", interpolation="always",
                     **_IMAGENET),
    # CLIP: the classifier's config is a CLIPConfig whose vision_config describes the tower
    ArchitectureSpec("CLIPVisionModel", "clip_vision_model", "vit", (_CLIP_LAYERS,), ("cls",), output="pooler_output",
                     default_for_type=True, image_mean=CLIP_MEAN, image_std=CLIP_STD),
    ArchitectureSpec("CLIPVisionModelWithProjection", "clip_vision_model", "vit", (_CLIP_LAYERS,), ("cls",),
                     output="image_embeds", image_mean=CLIP_MEAN, image_std=CLIP_STD),
    ArchitectureSpec("CLIPForImageClassification", "clip", "vit", (_CLIP_LAYERS,), ("cls",),
                     vision_config="vision_config", default_for_type=True, image_mean=CLIP_MEAN, image_std=CLIP_STD),
    # SigLIP: no CLS token; the bare tower pools with its attention head (pooler_output; the mean of the
    # patch tokens when it has none), the classifier mean-pools the patch tokens
    ArchitectureSpec("SiglipVisionModel", "siglip_vision_model", "vit", (_CLIP_LAYERS,), (), output="pooler_output",
                     default_for_type=True),
    ArchitectureSpec("SiglipForImageClassification", "siglip", "vit", (_CLIP_LAYERS,), (),
                     vision_config="vision_config", default_for_type=True),
    # LLaVA (llava-1.5 style): the language model's self-attention is the main stack; the vision tower is
    # a CLIP/SigLIP tower under `model.vision_tower` whose prefix tokens come from the tower's own row
    # above (extractor/adapters/lvlm.py), so the row names none itself
    ArchitectureSpec("LlavaForConditionalGeneration", "llava", "lvlm", (_LLAVA_LM_LAYERS, _LLAVA_VISION_LAYERS), (),
                     vision_config="vision_config", default_for_type=True, output="generated",
                     interpolation="none", image_mean=CLIP_MEAN, image_std=CLIP_STD),
    # speech-to-text: its output is the text it generates (samples/meta)
    ArchitectureSpec("WhisperForConditionalGeneration", "whisper", "s2t", _WHISPER_STACKS, output="generated",
                     interpolation="none", default_for_type=True),
)


def supported_architectures(family: str | None = None) -> list[str]:
    """Model class names in the table (of one family, or all)."""
    return [a.model_class for a in ARCHITECTURES if family is None or a.family == family]


def architecture(model_class: str) -> ArchitectureSpec:
    """The table row of ``model_class``; ModelError listing the supported ones if absent."""
    for a in ARCHITECTURES:
        if a.model_class == model_class:
            return a
    raise ModelError(f"architecture {model_class} is not supported; supported: {', '.join(supported_architectures())}")


def detect(config: Any) -> ArchitectureSpec:
    """The architecture of a transformers ``config``: ``config.architectures`` first, else the
    default row of ``config.model_type``.

    Raises:
        ModelError: no row fits; the message lists the supported architectures.
    """
    names = list(getattr(config, "architectures", None) or [])
    for name in names:
        for a in ARCHITECTURES:
            if a.model_class == name:
                return a
    model_type = getattr(config, "model_type", None)
    if not names:
        for a in ARCHITECTURES:
            if a.model_type == model_type and a.default_for_type:
                return a
    what = names[0] if names else f"model type {model_type!r}"
    raise ModelError(f"{what} is not supported by any adapter; supported: {', '.join(supported_architectures())}")


def class_names_of(config: Any) -> list[str]:
    """Class index -> name from ``config.id2label``."""
    id2label = getattr(config, "id2label", None) or {}
    return [str(id2label.get(i, id2label.get(str(i), i))) for i in range(len(id2label))]


def find_modules(model: Any, pattern: re.Pattern[str] | str) -> list[tuple[int, str, Any]]:
    """Modules whose path matches ``pattern`` (group 1 = layer index), as (layer, path, module)
    sorted by layer. Module paths are looked up with ``named_modules()``, never typed twice."""
    rx = re.compile(pattern) if isinstance(pattern, str) else pattern
    found = []
    for name, module in model.named_modules():
        m = rx.match(name)
        if m:
            found.append((int(m.group(1)), name, module))
    return sorted(found, key=lambda t: t[0])


# -- results passed between adapter and pipeline ----------------------------------------------


@dataclass
class PreparedBatch:
    """Model inputs of one batch, prepared on the CPU (possibly in a background thread).

    Attributes:
        inputs: keyword arguments of the model's forward (CPU tensors), e.g. ``pixel_values``
            float ``[batch, 3, image_h, image_w]``.
        labels: int ``[batch]`` (-1 = unknown).
        thumbnails: uint8 ``[batch, thumb_h, thumb_w, 3]`` or None.
        masks: uint8 ``[batch, thumb_h, thumb_w]`` (1 = object) or None.
    """

    inputs: dict[str, Any]
    labels: np.ndarray
    thumbnails: np.ndarray | None = None
    masks: np.ndarray | None = None


@dataclass
class BatchOutput:
    """What one forward returns, still on the model's device.

    Attributes:
        attention: kind -> float tensor ``[batch, layer, head, query_pos, key_pos]``.
        logits: float tensor ``[batch, n_classes]``, or None for a model without a classification head.
        lengths: kind -> int ``[batch, 2]`` valid (query_len, key_len) where lengths vary.
        embedding: float tensor ``[batch, dim]``: the pooled output of a backbone without a
            classification head (None for classifiers).
        predictions: int ``[batch]`` where the family defines them itself (generative models); None =
            the argmax of the logits, or -1 without logits.
        meta: per-sample JSON-able dicts for ``samples/meta`` (generated tokens, prompts, timings), or None.
        per_sample: name -> array ``[batch, ...]`` of the family's per-sample arrays
            (:meth:`Adapter.per_sample_specs`).
    """

    attention: dict[str, torch.Tensor]
    logits: torch.Tensor | None
    lengths: dict[str, np.ndarray] = field(default_factory=dict)
    embedding: torch.Tensor | None = None
    predictions: np.ndarray | None = None
    meta: list[dict[str, Any]] | None = None
    per_sample: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass(frozen=True)
class ModelSource:
    """Where a model was found.

    Attributes:
        ref: what the user passed (a directory or a hub id).
        path: the local directory holding ``config.json`` and the weights.
        from_cache: True when ``ref`` was a hub id resolved in the local Hugging Face cache.
    """

    ref: str
    path: Path
    from_cache: bool = False

    @property
    def name(self) -> str:
        """Short display name: the hub id, or the directory's name."""
        return self.ref if self.from_cache else self.path.name


# -- adapters ----------------------------------------------------------------------------------


class Adapter(ABC):
    """One model family. Subclasses set ``name`` and implement loading, preparing and running.

    An instance wraps one loaded model (eval mode, eager attention) on one device.
    """

    name: ClassVar[str]
    #: what one input is: "image" (vit), later "audio" (s2t), "image+prompt" (lvlm); the pipeline
    #: picks the input collector by this name, and the attribution methods of this kind
    input_kind: ClassVar[str] = "image"
    #: attribution methods recorded when ``--attributions`` is not given (cheap ones)
    default_attributions: ClassVar[tuple[str, ...]] = ()
    #: the family writes ``samples/meta`` (one JSON object per sample)
    writes_meta: ClassVar[bool] = False
    #: (height, width) of the stored thumbnails, or None for inputs without one (audio)
    thumbnail_size: tuple[int, int] | None = None
    #: what one input is called in messages and progress bars ("image", "clip")
    input_noun: ClassVar[str] = "image"
    #: the family can store per-head query/key vectors (``--store-qk``: self-attention over one sequence)
    supports_qk: ClassVar[bool] = True

    def __init__(self, *, model: Any, config: Any, arch: ArchitectureSpec, source: ModelSource,
                 device: torch.device, autocast_dtype: torch.dtype | None) -> None:
        self.model = model
        self.config = config
        self.arch = arch
        self.source = source
        self.device = device
        self.autocast_dtype = autocast_dtype

    # construction
    @classmethod
    @abstractmethod
    def load(cls, source: ModelSource, config: Any, arch: ArchitectureSpec, *, device: torch.device,
             autocast_dtype: torch.dtype | None, **options: Any) -> Adapter:
        """Load the model (and its processor) from ``source.path``.

        ``options`` are the family's own load options (vit: ``image_size``); an option the family does
        not take is an :class:`InputError`.
        """

    # description
    @property
    def model_name(self) -> str:
        return self.source.name

    @property
    def model_class(self) -> str:
        return type(self.model).__name__

    @property
    def has_classifier(self) -> bool:
        """False for a backbone without a classification head (it outputs an embedding, no logits)."""
        return self.arch.has_classifier

    @property
    def class_names(self) -> list[str]:
        """Class index -> name from ``config.id2label``; empty for a backbone without a classification
        head (its config's default ``LABEL_0, LABEL_1`` name nothing)."""
        return class_names_of(self.config) if self.has_classifier else []

    def config_dict(self) -> dict[str, Any]:
        return self.config.to_dict()

    @abstractmethod
    def stacks(self) -> list[StackSpec]:
        """One :class:`StackSpec` (with its :class:`TokenLayout`) per attention kind recorded."""

    def stack(self, kind: str = "self") -> StackSpec:
        """The :class:`StackSpec` of one recorded attention kind."""
        for st in self.stacks():
            if st.kind == kind:
                return st
        raise KeyError(f"{self.model_class} records no {kind!r} attention")

    @property
    def main_layout(self) -> TokenLayout:
        """Token layout of the first stack (what attributions and rollout use)."""
        return self.stacks()[0].layout

    @classmethod
    def collect_options(cls, source: ModelSource, config: Any, arch: ArchitectureSpec) -> dict[str, Any]:
        """Keyword arguments for this family's input collector that follow from the model's config
        (s2t: the sample rate and the longest clip the model's window holds), so that inputs the model
        cannot take are skipped before anything is loaded; none by default."""
        return {}

    def extra_params(self) -> dict[str, Any]:
        """Facts of this family's recording stored in the extraction parameters under ``"family"``
        (JSON-able: frame durations, the model's own alignment heads, ...); none by default."""
        return {}

    def plan(self, items: Sequence[Any]) -> None:
        """Called once with every input before the recording is laid out, so that a family whose
        sequence lengths depend on the inputs (audio duration, prompt length) can size its stacks
        (:meth:`stacks`) and per-sample arrays; nothing to do for fixed-size image models."""

    # per batch
    @abstractmethod
    def prepare(self, items: Sequence[Any]) -> PreparedBatch:
        """Read and preprocess a batch of inputs on the CPU (thread-safe: no model access)."""

    @abstractmethod
    def run(self, batch: PreparedBatch) -> BatchOutput:
        """Forward one prepared batch with attention outputs (caller holds ``torch.no_grad()``)."""

    @abstractmethod
    def logits_fn(self) -> Callable[[Any], Any]:
        """``forward(model_input) -> logits [batch, classes]`` on the model's device (differentiable),
        used by attribution methods and head importance. Only for classifiers (:attr:`has_classifier`)."""

    # attributions: what the methods explain and how they run (families differ: images, audio, text)
    @classmethod
    def resolve_target(cls, name: str, arch: ArchitectureSpec) -> Any:
        """``--target`` -> this family's target (an :class:`extractor.targets.Target`); checked before
        any weights are loaded. Raises InputError naming the targets that fit."""
        if name != "auto":
            raise InputError(f"--target {name}: the {cls.name} family has no attribution targets to choose from")
        from extractor.targets import Target

        return Target("auto", False, "")

    @classmethod
    def check_attributions(cls, methods: Sequence[str], target: Any) -> None:
        """Refuse methods of another input kind (one line listing this family's methods)."""
        from extractor import attributions as A

        mine = A.available(cls.input_kind)
        other = [m for m in methods if m not in mine]
        if other:
            raise InputError(f"attribution method(s) {', '.join(other)} do not apply to {cls.input_kind} inputs; "
                             f"a {cls.name} model takes: {', '.join(mine) or 'none'}")

    def attribution_specs(self, methods: Sequence[str], target: Any) -> list[AttributionSpec]:
        """What the writer allocates for each method (shape, resolution, description)."""
        if methods:
            raise InputError(f"the {self.name} family records no attributions")
        return []

    def attribute(self, methods: Sequence[str], batch: PreparedBatch, out: BatchOutput, target: Any,
                  predictions: np.ndarray) -> dict[str, np.ndarray]:
        """Run the attribution methods on one batch: name -> float ``[batch, *shape]``."""
        return {}

    def per_sample_specs(self) -> list[PerSampleSpec]:
        """The family's per-sample arrays besides the maps (``per_sample/<name>``); none by default."""
        return []

    def after_recording(self, path: Any) -> list[str]:
        """Family analyses run on the finished recording (after the basic head statistics), e.g. the lvlm
        head metrics; returns one line per result for the terminal. Nothing by default."""
        return []

    def embedding_fn(self) -> Callable[[Any], Any]:
        """``forward(model_input) -> embedding [batch, dim]`` (differentiable): the pooled output of a
        backbone without a classification head, what its attribution targets and head importance use."""
        raise ModelError(f"{self.model_class} has no pooled embedding output")

    # module lookup (hooks, tests, importance)
    def modules(self, what: str = "output_projection", kind: str = "self") -> list[tuple[int, str, Any]]:
        """(layer, path, module) of every ``what`` module of stack ``kind``, in layer order.

        Args:
            what: "attention", "query", "key", "value" or "output_projection".
        """
        return find_modules(self.model, self.arch.stack(kind).pattern(what))


_ADAPTERS: dict[str, type[Adapter]] = {}


def register_adapter(cls: type[Adapter]) -> type[Adapter]:
    """Class decorator: add an adapter to the registry under ``cls.name``."""
    if cls.name in _ADAPTERS and _ADAPTERS[cls.name] is not cls:
        raise ValueError(f"adapter {cls.name!r} is registered twice")
    _ADAPTERS[cls.name] = cls
    return cls


def available_adapters() -> list[str]:
    """Registered adapter (family) names."""
    return list(_ADAPTERS)


def get_adapter(name: str) -> type[Adapter]:
    """The adapter class registered as ``name``.

    Raises:
        InputError: unknown name; the message lists the registered ones.
    """
    try:
        return _ADAPTERS[name]
    except KeyError:
        raise InputError(f"unknown model family {name!r}; available: {', '.join(available_adapters())}") from None


# -- loading ----------------------------------------------------------------------------------

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")


def resolve_model(ref: str | os.PathLike) -> ModelSource:
    """Find a model: a local ``save_pretrained`` directory, or a hub id in the local cache.

    attnviz never downloads: a hub id that is not cached is an error.

    Raises:
        ModelError: the path is not a model directory, or the id is neither a directory nor cached.
    """
    text = str(ref)
    path = Path(text).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise ModelError(f"{text} is not a model directory (no config.json); "
                             "give a folder made by save_pretrained or a cached hub id")
        return ModelSource(text, path.resolve())
    if path.exists():
        raise ModelError(f"{text} is a file, not a model directory; give the folder made by save_pretrained")
    if not _HUB_ID.match(text) or text.startswith((".", "/", "~")):
        raise ModelError(f"model directory {text} does not exist")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    try:
        snap = Path(snapshot_download(text, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError, ValueError):
        raise ModelError(f"{text}: no such model directory, and not a model in the local Hugging Face cache "
                         "(attnviz never downloads; fetch it first, e.g. with `hf download`)") from None
    if not (snap / "config.json").is_file():
        raise ModelError(f"{text}: the cached snapshot has no config.json")
    return ModelSource(text, snap, from_cache=True)


def load_config(source: ModelSource) -> Any:
    """The transformers config of a resolved model (local files only)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source.path, local_files_only=True)
    except (AttnvizError, KeyboardInterrupt, MemoryError):
        raise
    except Exception as e:  # noqa: BLE001 - a damaged config.json fails in many ways
        raise ModelError(f"{source.ref}: cannot read config.json ({_first_line(e)})") from None


def load_model(ref: str | os.PathLike, *, family: str | None = None, device: str = "auto",
               dtype: str = "float32", image_size: tuple[int, int] | None = None) -> Adapter:
    """Resolve, detect and load a model through its adapter.

    Args:
        ref: a ``save_pretrained`` directory or a cached hub id.
        family: expected family ("vit", ...); None = whatever the config says.
        device: "auto" | "cpu" | "cuda".
        dtype: forward dtype on the GPU: "float32" | "float16" | "bfloat16".
        image_size: (height, width) of the model input when it should differ from the model's own
            (position embeddings are interpolated; image models only). None: the model's size.

    Raises:
        ModelError: not found, not a model, unsupported architecture, family mismatch, load failure.
        InputError: bad device / dtype.
    """
    from extractor.device import resolve_device, resolve_dtype

    dev = resolve_device(device)
    autocast = resolve_dtype(dtype, dev)
    source = resolve_model(ref)
    config = load_config(source)
    arch = detect(config)
    if family is not None:
        get_adapter(family)
        if arch.family != family:
            raise ModelError(f"{source.ref} is a {arch.model_class} ({arch.family} family), not a {family} model")
    options = {"image_size": image_size} if image_size is not None else {}
    return get_adapter(arch.family).load(source, config, arch, device=dev, autocast_dtype=autocast, **options)


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__

