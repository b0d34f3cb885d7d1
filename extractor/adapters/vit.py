"""The ``vit`` adapter: vision transformers with self-attention over prefix tokens + patches.

Handles every ``family="vit"`` row of :data:`extractor.adapters.base.ARCHITECTURES`: image classifiers
(ViT, DeiT, DINOv2, CLIP and SigLIP ``*ForImageClassification``) and bare backbones without a
classification head (``ViTModel``, ``DeiTModel``, ``Dinov2Model``, ``CLIPVisionModel[WithProjection]``,
``SiglipVisionModel``, ...), which output a pooled embedding instead of logits.

Loading is local only (a ``save_pretrained`` directory or the local hub cache), safetensors only,
with eager attention so that the model returns its attention probabilities. Inputs can be recorded at
another resolution than the config's (``image_size``): the processor makes that size and the position
embeddings are interpolated (``interpolate_pos_encoding=True``, or by the model itself for DINOv2), so
the patch grid differs from the config's.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import numpy as np
import torch
from PIL import Image

from attnviz.errors import InputError, ModelError
from attnviz.store.schema import StackSpec, TokenLayout
from extractor.adapters.base import (
    Adapter,
    ArchitectureSpec,
    BatchOutput,
    ModelSource,
    PreparedBatch,
    register_adapter,
)
from extractor.device import autocast
from extractor.inputs import ImageInput, read_images, read_mask

__all__ = ["VitAdapter", "THUMBNAIL_MAX"]

#: thumbnails are the model input as seen, downscaled so that the longer side is at most this
THUMBNAIL_MAX = 224


@register_adapter
class VitAdapter(Adapter):
    """Adapter for ViT-like image classifiers (see the module docstring).

    Attention stack ``"self"``: maps ``[batch, layer, head, tokens, tokens]`` with
    ``tokens = n_prefix + grid_h * grid_w`` in the model's order (prefix tokens first, then patches
    row-major).
    """

    name = "vit"
    input_kind = "image"
    default_attributions = ("rollout", "saliency")

    def __init__(self, *, processor: Any, input_size: tuple[int, int], processor_kwargs: dict[str, Any] | None = None,
                 **kw: Any) -> None:
        super().__init__(**kw)
        self.processor = processor
        self.input_size = input_size
        # call-time overrides of the processor's size/crop (a resolution other than the config's)
        self.processor_kwargs = dict(processor_kwargs or {})
        self.vision = self.arch.vision(self.config)
        size = self.vision.image_size
        native = (size, size) if isinstance(size, int) else tuple(size)
        # pass interpolate_pos_encoding only where it changes something: at the native size the
        # forward is the model's own, bit for bit
        self._forward_kwargs = ({"interpolate_pos_encoding": True}
                                if self.arch.interpolation == "flag" and tuple(input_size) != tuple(native) else {})
        patch = self.vision.patch_size
        ph, pw = (patch, patch) if isinstance(patch, int) else tuple(patch)
        h, w = input_size
        if h % ph or w % pw:
            raise ModelError(f"{self.source.ref}: input size {h}x{w} is not a multiple of the patch size {ph}x{pw}")
        prefix = self.arch.prefix_names(self.config)
        self.layout = TokenLayout(n_prefix=len(prefix), prefix_names=prefix, grid=(h // ph, w // pw),
                                  patch_size=(ph, pw), image_size=(h, w))
        scale = min(1.0, THUMBNAIL_MAX / max(h, w))
        self.thumbnail_size = (max(1, round(h * scale)), max(1, round(w * scale)))
        proc = processor
        self._mean = np.asarray(proc.image_mean if getattr(proc, "do_normalize", False) else (0.0, 0.0, 0.0),
                                np.float32).reshape(3, 1, 1)
        self._std = np.asarray(proc.image_std if getattr(proc, "do_normalize", False) else (1.0, 1.0, 1.0),
                               np.float32).reshape(3, 1, 1)
        self._rescale = float(proc.rescale_factor) if getattr(proc, "do_rescale", False) else 1.0

    # -- loading -----------------------------------------------------------------------------

    @classmethod
    def load(cls, source: ModelSource, config: Any, arch: ArchitectureSpec, *, device: torch.device,
             autocast_dtype: torch.dtype | None, image_size: tuple[int, int] | None = None,
             **options: Any) -> VitAdapter:
        """Load the model and its image processor.

        Args:
            image_size: (height, width) to record at instead of the processor's own size; it must be a
                multiple of the patch size, and the model must interpolate its position embeddings
                (every row of the table but those with ``interpolation="none"``).
        """
        import transformers

        from extractor.loading import load_pretrained

        if options:
            raise InputError(f"option(s) {', '.join(sorted(options))} do not apply to a vit model")
        if image_size is not None and arch.interpolation == "none":
            raise InputError(f"{arch.model_class} cannot interpolate its position embeddings: record it at its own "
                             "input size (leave out --image-size)")
        model = load_pretrained(getattr(transformers, arch.model_class), source.path, source.ref,
                                attn_implementation="eager")
        model.eval().to(device)
        processor = _load_processor(source, config, arch)
        kwargs = _size_overrides(processor, image_size) if image_size is not None else {}
        input_size = _fixed_input_size(processor, source, kwargs)
        return cls(model=model, config=config, arch=arch, source=source, device=device,
                   autocast_dtype=autocast_dtype, processor=processor, input_size=input_size,
                   processor_kwargs=kwargs)

    # -- description -------------------------------------------------------------------------

    def stacks(self) -> list[StackSpec]:
        t = self.layout.n_tokens
        assert t is not None
        return [StackSpec("self", int(self.vision.num_hidden_layers), int(self.vision.num_attention_heads), t, t,
                          self.layout)]

    # -- per batch ---------------------------------------------------------------------------

    def prepare(self, items: Sequence[ImageInput]) -> PreparedBatch:
        """Decode, preprocess, and make thumbnails/masks of a batch (CPU; no model access).

        Returns:
            ``inputs["pixel_values"]`` float32 ``[batch, 3, image_h, image_w]``; thumbnails uint8
            ``[batch, thumb_h, thumb_w, 3]`` (the model input un-normalised, downscaled to at most
            224 px); masks uint8 ``[batch, thumb_h, thumb_w]`` (1 = object) when any item has a mask.
        """
        images = read_images(items)
        px = self.processor(images, return_tensors="pt", **self.processor_kwargs)["pixel_values"]
        if tuple(px.shape[-2:]) != self.input_size:
            raise ModelError(f"the image processor made {tuple(px.shape[-2:])} inputs, expected {self.input_size}")
        thumbs = self._thumbnails(px.numpy())
        masks = None
        if any(it.mask is not None for it in items):
            masks = np.stack([self._mask(it) for it in items])
        labels = np.array([it.label for it in items], np.int32)
        if self.device.type == "cuda":
            # page-locked in the preparing thread, so that run()'s non_blocking copy to the GPU is asynchronous
            px = px.pin_memory()
        return PreparedBatch(inputs={"pixel_values": px}, labels=labels, thumbnails=thumbs, masks=masks)

    def run(self, batch: PreparedBatch) -> BatchOutput:
        px = batch.inputs["pixel_values"].to(self.device, non_blocking=True)
        with autocast(self.device, self.autocast_dtype):
            out = self.model(pixel_values=px, output_attentions=True, **self._forward_kwargs)
        attentions = out.attentions
        if not attentions:
            raise ModelError(f"{self.model_class} returned no attention weights (is eager attention set?)")
        b, h, q, k = attentions[0].shape
        if q != self.layout.n_tokens:
            raise ModelError(f"{self.model_class} has {q} tokens, expected {self.layout.n_tokens} = "
                             f"{self.layout.n_prefix} prefix + {self.layout.n_patches} patches; "
                             "is its prefix-token row in the architecture table right?")
        # one buffer, one pass: copy each layer's maps straight into a float16 stack on the device,
        # so the host copy that follows is one transfer of half the bytes
        maps = torch.empty((b, len(attentions), h, q, k), dtype=torch.float16, device=attentions[0].device)
        for layer, a in enumerate(attentions):
            maps[:, layer].copy_(a)
        if self.has_classifier:
            return BatchOutput(attention={"self": maps}, logits=out.logits.float())
        return BatchOutput(attention={"self": maps}, logits=None, embedding=self._embedding(out).float())

    # -- attributions (extractor.attributions, image methods; targets: extractor.targets) -------

    @classmethod
    def resolve_target(cls, name: str, arch: ArchitectureSpec) -> Any:
        from extractor.targets import resolve_target

        return resolve_target(name, has_classifier=arch.has_classifier)

    @classmethod
    def check_attributions(cls, methods: Sequence[str], target: Any) -> None:
        from extractor.targets import check_methods

        super().check_attributions(methods, target)
        check_methods(target, list(methods))

    def attribution_specs(self, methods: Sequence[str], target: Any) -> list[Any]:
        from extractor import attributions as A

        return [A.spec(m, layout=self.layout, target=target.name) for m in methods]

    def attribute(self, methods: Sequence[str], batch: PreparedBatch, out: BatchOutput, target: Any,
                  predictions: np.ndarray) -> dict[str, np.ndarray]:
        """Every method on the batch's own model input; rollout reads the maps as recorded (float16)."""
        from extractor import attributions as A
        from extractor.targets import target_forward

        if not methods:
            return {}
        px = batch.inputs["pixel_values"].to(self.device)
        forward, targets = target_forward(self, target, px, labels=batch.labels, predictions=predictions)
        attn32 = out.attention["self"].float().cpu().numpy()
        return {m: A.compute(m, forward=forward, pixel_values=px, targets=targets, attentions=attn32,
                             layout=self.layout) for m in methods}

    def logits_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        if not self.has_classifier:
            raise ModelError(f"{self.model_class} has no classification head, so no logits; its targets are "
                             "embedding_norm or embedding_similarity")
        model, device, dtype, kw = self.model, self.device, self.autocast_dtype, self._forward_kwargs

        def forward(pixel_values: torch.Tensor) -> torch.Tensor:
            """``pixel_values`` float ``[batch, 3, image_h, image_w]`` -> logits float32 ``[batch, classes]``."""
            with autocast(device, dtype):
                return model(pixel_values=pixel_values, **kw).logits.float()

        return forward

    def embedding_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        if self.has_classifier:
            raise ModelError(f"{self.model_class} is a classifier: its targets are the logits (predicted or label)")
        model, device, dtype, kw = self.model, self.device, self.autocast_dtype, self._forward_kwargs

        def forward(pixel_values: torch.Tensor) -> torch.Tensor:
            """``pixel_values`` float ``[batch, 3, image_h, image_w]`` -> pooled embedding float32 ``[batch, dim]``."""
            with autocast(device, dtype):
                return self._embedding(model(pixel_values=pixel_values, **kw)).float()

        return forward

    def _embedding(self, out: Any) -> torch.Tensor:
        """The pooled image embedding ``[batch, dim]`` of a backbone's output (the table's ``output``)."""
        how = self.arch.output
        if how == "image_embeds":
            return out.image_embeds
        if how == "pooler_output" and getattr(out, "pooler_output", None) is not None:
            return out.pooler_output
        hidden = out.last_hidden_state
        if how == "cls_token":
            return hidden[:, 0]
        # mean over the patch tokens (also a pooler_output model built without its pooling head)
        return hidden[:, self.layout.n_prefix:].mean(dim=1)

    # -- helpers -----------------------------------------------------------------------------

    def _thumbnails(self, px: np.ndarray) -> np.ndarray:
        """px float ``[batch, 3, h, w]`` (normalised model input) -> uint8 ``[batch, th, tw, 3]``."""
        raw = (px * self._std + self._mean) / self._rescale
        rgb = np.clip(np.rint(raw), 0, 255).astype(np.uint8).transpose(0, 2, 3, 1)
        if rgb.shape[1:3] == self.thumbnail_size:
            return np.ascontiguousarray(rgb)
        th, tw = self.thumbnail_size
        return np.stack([np.asarray(Image.fromarray(x).resize((tw, th), Image.Resampling.LANCZOS)) for x in rgb])

    def _mask(self, it: ImageInput) -> np.ndarray:
        """The item's mask through the processor's own geometry (resize/crop), at thumbnail size."""
        th, tw = self.thumbnail_size
        if it.mask is None:
            return np.zeros((th, tw), np.uint8)
        m = read_mask(it.mask)
        binary = Image.fromarray(np.where(np.asarray(m) > 0, 255, 0).astype(np.uint8)).convert("RGB")
        geo = self.processor([binary], do_normalize=False, do_rescale=False, return_tensors="np",
                             **self.processor_kwargs)["pixel_values"]
        plane = np.asarray(geo[0, 0], np.float32)
        if plane.shape != (th, tw):
            plane = np.asarray(Image.fromarray(plane.astype(np.uint8)).resize((tw, th), Image.Resampling.BILINEAR),
                               np.float32)
        return (plane >= 128).astype(np.uint8)


def _load_processor(source: ModelSource, config: Any, arch: ArchitectureSpec) -> Any:
    """The image processor saved with the model, else one built from the config.

    The PIL backend is chosen explicitly: the torchvision backend needs torchvision, which the CPU
    torch wheel does not bring, and transformers would warn about the fallback on every run.
    """
    if (source.path / "preprocessor_config.json").is_file():
        from transformers import AutoImageProcessor

        from extractor.loading import guarded

        with guarded("preprocessor_config.json", source.ref):
            return AutoImageProcessor.from_pretrained(source.path, backend="pil", local_files_only=True)
    from transformers import ViTImageProcessorPil

    size = arch.vision(config).image_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return ViTImageProcessorPil(do_resize=True, size={"height": h, "width": w}, do_rescale=True,
                                rescale_factor=1 / 255, do_normalize=True, image_mean=list(arch.image_mean),
                                image_std=list(arch.image_std))


def _size_overrides(processor: Any, image_size: tuple[int, int]) -> dict[str, Any]:
    """Processor call arguments that make inputs of ``image_size`` (height, width) with the processor's
    own geometry: a processor that resizes to a fixed size resizes to ``image_size``; one that resizes the
    shortest edge and centre-crops keeps its resize-to-crop ratio (DINOv2: 256 -> 224) and crops
    ``image_size``."""
    h, w = (int(image_size[0]), int(image_size[1]))
    if h < 1 or w < 1:
        raise InputError(f"--image-size must be positive, got {h}x{w}")
    size = getattr(processor, "size", None)
    crop = getattr(processor, "crop_size", None) if getattr(processor, "do_center_crop", False) else None

    def get(obj: Any, key: str) -> Any:
        return obj.get(key) if isinstance(obj, dict) else getattr(obj, key, None)

    if crop is not None and get(crop, "height"):
        ratio = 1.0
        if get(size, "shortest_edge"):
            ratio = float(get(size, "shortest_edge")) / min(float(get(crop, "height")), float(get(crop, "width")))
            resize = {"shortest_edge": int(round(min(h, w) * ratio))}
        else:
            ratio_h = float(get(size, "height") or get(crop, "height")) / float(get(crop, "height"))
            ratio_w = float(get(size, "width") or get(crop, "width")) / float(get(crop, "width"))
            resize = {"height": int(round(h * ratio_h)), "width": int(round(w * ratio_w))}
        return {"size": resize, "crop_size": {"height": h, "width": w}}
    return {"size": {"height": h, "width": w}}


def _fixed_input_size(processor: Any, source: ModelSource, kwargs: dict[str, Any] | None = None) -> tuple[int, int]:
    """The (h, w) the processor makes; two probe images of different aspect ratios must agree."""
    sizes = set()
    for shape in ((37, 53), (61, 29)):
        probe = Image.new("RGB", (shape[1], shape[0]), (127, 127, 127))
        px = processor([probe], return_tensors="np", **(kwargs or {}))["pixel_values"]
        sizes.add(tuple(int(v) for v in px.shape[-2:]))
    if len(sizes) != 1:
        raise ModelError(f"{source.ref}: the image processor does not make a fixed input size ({sorted(sizes)}); "
                         "attnviz needs a fixed patch grid")
    return sizes.pop()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
