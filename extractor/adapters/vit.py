"""The ``vit`` adapter: image classifiers with self-attention over prefix tokens + patches.

Handles every ``family="vit"`` row of :data:`extractor.adapters.base.ARCHITECTURES`
(ViTForImageClassification, DeiTForImageClassification[WithTeacher], Dinov2WithRegisters...).
Loading is local only (a ``save_pretrained`` directory or the local hub cache), safetensors only,
with eager attention so that the model returns its attention probabilities.
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
from extractor.inputs import ImageInput, read_image, read_mask

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

    def __init__(self, *, processor: Any, input_size: tuple[int, int], **kw: Any) -> None:
        super().__init__(**kw)
        self.processor = processor
        self.input_size = input_size
        patch = self.config.patch_size
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
             autocast_dtype: torch.dtype | None) -> VitAdapter:
        import transformers

        from transformers.utils import logging as hf_logging

        model_cls = getattr(transformers, arch.model_class)
        bar = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # our own bar follows; one is enough
        try:
            model = model_cls.from_pretrained(source.path, attn_implementation="eager", local_files_only=True,
                                              use_safetensors=True)
        except (OSError, ValueError, RuntimeError) as e:
            raise ModelError(f"{source.ref}: cannot load {arch.model_class} weights ({_first_line(e)}); "
                             "attnviz loads model.safetensors made by save_pretrained") from None
        finally:
            if bar:
                hf_logging.enable_progress_bar()
        model.eval().to(device)
        processor = _load_processor(source, config, arch)
        input_size = _fixed_input_size(processor, source)
        return cls(model=model, config=config, arch=arch, source=source, device=device,
                   autocast_dtype=autocast_dtype, processor=processor, input_size=input_size)

    # -- description -------------------------------------------------------------------------

    def stacks(self) -> list[StackSpec]:
        t = self.layout.n_tokens
        assert t is not None
        return [StackSpec("self", int(self.config.num_hidden_layers), int(self.config.num_attention_heads), t, t,
                          self.layout)]

    # -- per batch ---------------------------------------------------------------------------

    def prepare(self, items: Sequence[ImageInput]) -> PreparedBatch:
        """Decode, preprocess, and make thumbnails/masks of a batch (CPU; no model access).

        Returns:
            ``inputs["pixel_values"]`` float32 ``[batch, 3, image_h, image_w]``; thumbnails uint8
            ``[batch, thumb_h, thumb_w, 3]`` (the model input un-normalised, downscaled to at most
            224 px); masks uint8 ``[batch, thumb_h, thumb_w]`` (1 = object) when any item has a mask.
        """
        images = []
        for it in items:
            try:
                images.append(read_image(it.path))
            except Exception as e:
                raise InputError(f"{it.id} could be read when the run started but not now ({e}); "
                                 "did the input change?") from None
        px = self.processor(images, return_tensors="pt")["pixel_values"]
        if tuple(px.shape[-2:]) != self.input_size:
            raise ModelError(f"the image processor made {tuple(px.shape[-2:])} inputs, expected {self.input_size}")
        thumbs = self._thumbnails(px.numpy())
        masks = None
        if any(it.mask is not None for it in items):
            masks = np.stack([self._mask(it) for it in items])
        labels = np.array([it.label for it in items], np.int32)
        return PreparedBatch(inputs={"pixel_values": px}, labels=labels, thumbnails=thumbs, masks=masks)

    def run(self, batch: PreparedBatch) -> BatchOutput:
        px = batch.inputs["pixel_values"].to(self.device, non_blocking=True)
        with autocast(self.device, self.autocast_dtype):
            out = self.model(pixel_values=px, output_attentions=True)
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
        return BatchOutput(attention={"self": maps}, logits=out.logits.float())

    def logits_fn(self) -> Callable[[torch.Tensor], torch.Tensor]:
        model, device, dtype = self.model, self.device, self.autocast_dtype

        def forward(pixel_values: torch.Tensor) -> torch.Tensor:
            """``pixel_values`` float ``[batch, 3, image_h, image_w]`` -> logits float32 ``[batch, classes]``."""
            with autocast(device, dtype):
                return model(pixel_values=pixel_values).logits.float()

        return forward

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
        geo = self.processor([binary], do_normalize=False, do_rescale=False, return_tensors="np")["pixel_values"]
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

        try:
            return AutoImageProcessor.from_pretrained(source.path, backend="pil", local_files_only=True)
        except (OSError, ValueError, KeyError) as e:
            raise ModelError(f"{source.ref}: cannot load preprocessor_config.json ({_first_line(e)})") from None
    from transformers import ViTImageProcessorPil

    size = config.image_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return ViTImageProcessorPil(do_resize=True, size={"height": h, "width": w}, do_rescale=True,
                                rescale_factor=1 / 255, do_normalize=True, image_mean=list(arch.image_mean),
                                image_std=list(arch.image_std))


def _fixed_input_size(processor: Any, source: ModelSource) -> tuple[int, int]:
    """The (h, w) the processor makes; two probe images of different aspect ratios must agree."""
    sizes = set()
    for shape in ((37, 53), (61, 29)):
        probe = Image.new("RGB", (shape[1], shape[0]), (127, 127, 127))
        px = processor([probe], return_tensors="np")["pixel_values"]
        sizes.add(tuple(int(v) for v in px.shape[-2:]))
    if len(sizes) != 1:
        raise ModelError(f"{source.ref}: the image processor does not make a fixed input size ({sorted(sizes)}); "
                         "attnviz needs a fixed patch grid")
    return sizes.pop()


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
