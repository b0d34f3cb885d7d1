"""The ``lvlm`` adapter: vision-language models of the LLaVA kind (``LlavaForConditionalGeneration``).

A LLaVA model is a vision tower (CLIP-style ViT), a projector that maps the tower's patch features to
*image tokens*, and a decoder language model that reads them in place of the image placeholder in the
prompt. For every question the adapter

1. **generates** the answer greedily (``--max-new-tokens``, batched, left-padded prompts);
2. runs one **teacher-forced pass** over prompt + generated tokens (eager attention, right padding, so
   every real token sees exactly what it sees unpadded) and records

   - the language model's attention, stack ``"self"``: every position to every position, or with
     ``answer_rows_only`` only the rows of the *generation steps* (row ``j`` is the position that
     generates answer token ``j``, i.e. position ``answer_start - 1 + j``; layout ``query_axis`` =
     ``"answer_steps"``) -- the prompt x prompt block is most of the bytes and no answer analysis reads it;
   - the vision tower's self-attention, stack ``"vision"``: a ViT stack (CLS + patch grid) exactly as the
     ``vit`` family records it, so the spatial and pattern analyses run on it unchanged;
   - the image-token span (``per_sample/image_span``, ``samples/meta``, and the layout's ``image_span``
     when every question has it at the same place), the answer span;
   - per token and layer the **sink statistic** phi (Kang et al. 2025, below), ``per_sample/sink_phi``;
3. with ``vhd``: one **image-free forward** of the same text with the image tokens removed (batched
   across the questions of a batch) and the **vision-aware head divergence** of every head at every
   generation step (He et al. 2025, Eq. 4, below), ``per_sample/vhd`` and the token-level T-VHD
   ``per_sample/t_vhd``;
4. with ``reinforce=alpha``: VHR-style reinforcement -- the heads whose VHD at the first generation
   step lies above their layer's median are scaled by ``alpha`` and the answer is generated again;
   both answers are stored (``samples/meta``).

Definitions (also in ``docs/vlm.md``):

- **Head output** ``o_{l,h}(t)``: head ``h`` of layer ``l`` at position ``t``, the ``[h*d:(h+1)*d]`` slice
  of the input of the layer's output projection ``o_proj`` (before ``W_O`` mixes the heads).
- **VHD** (He et al., "Cracking the Code of Hallucination in LVLMs with Vision-aware Head Divergence",
  CVPR 2025, Eq. 4): ``VHD_{l,h}(j) = || o_{l,h}(t_j | image, text) - o_{l,h}(t'_j | text) ||_2``, the
  Euclidean distance between the head's output at the generation step ``t_j`` of answer token ``j`` with
  the image and without it (the same token sequence with the image tokens removed: ``t'_j = t_j -
  n_image_tokens``). **T-VHD** (ibid.): ``T-VHD(j) = sum_l sum_{h in top-k_l(j)} VHD_{l,h}(j)``, the sum
  over layers of the ``k`` largest VHDs of the layer (``vhd_top_k``).
- **Sink statistic** (Kang, Kim, Kim & Kim, "See What You Are Told: Visual Attention Sink in Large
  Multimodal Models", ICLR 2025): ``phi_l(x) = max_{d in D} |x_d / rms(x)|`` for the hidden state ``x``
  entering layer ``l`` (RMS normalisation without the learned gain, so ``mean_d (x_d/rms(x))^2 = 1`` and
  ``phi <= sqrt(hidden_size)``), over the *massive-activation dimensions* ``D``. The paper takes ``D``
  from the language model's BOS token; here ``D`` is found from the data (``sink_calibration``
  questions, before recording): the dimensions ``d`` for which some but at most ``SINK_MAX_SHARE`` of
  the tokens of some layer have ``|x_d / rms(x)| > tau`` -- extreme for a few tokens, not an offset that
  every token carries. Visual sink tokens of layer ``l``: image tokens with ``phi_l > tau``
  (``sink_tau``, the paper's default 20).

Loading is local only (a ``save_pretrained`` directory or the local hub cache), safetensors only, eager
attention on both sub-configs; the processor (image processor, tokenizer, chat template) comes from
the model directory (``AutoProcessor``; the image processor with the PIL backend).
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np
import torch

from attnviz.errors import InputError, ModelError
from attnviz.store.schema import ANSWER_STEPS, PerSampleSpec, StackSpec, TokenLayout
from extractor.adapters.base import (
    ARCHITECTURES,
    Adapter,
    ArchitectureSpec,
    BatchOutput,
    ModelSource,
    PreparedBatch,
    register_adapter,
)
from extractor.device import autocast
from extractor.inputs import read_images
from extractor.vqa_inputs import VQAInput, normalize_answer

__all__ = ["LvlmAdapter", "LvlmOptions", "SINK_MAX_SHARE", "massive_dimensions", "rms_normalized", "sink_phi",
           "head_divergence", "token_vhd", "reinforcement_gates"]

#: a dimension is massive when more than 0 and at most this share of a layer's tokens exceed tau in it
SINK_MAX_SHARE = 0.1
_NO_IMPORTANCE = ("pruning-based head importance needs a classifier or an image backbone; a vision-language model's "
                  "output is generated text (its VHD and image attention are on the Vision-language page)")


# -- the measurements, as functions of tensors (the tests check them against hand computations) --------


def rms_normalized(hidden: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``x / rms(x)`` per token: float ``[..., dim]`` -> float32 ``[..., dim]`` (RMSNorm without its gain)."""
    x = hidden.float()
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def massive_dimensions(counts: np.ndarray, totals: np.ndarray, *, max_share: float = SINK_MAX_SHARE) -> list[int]:
    """The massive-activation dimensions from streamed counts.

    Args:
        counts: int ``[layer, dim]``: tokens whose ``|x_d / rms(x)|`` exceeds tau, per layer and dimension.
        totals: int ``[layer]``: tokens seen per layer.
        max_share: a dimension counts when ``0 < counts[l, d] <= max_share * totals[l]`` for some layer.

    Returns:
        sorted dimension indices.
    """
    counts = np.asarray(counts, np.int64)
    limit = max_share * np.asarray(totals, np.float64)[:, None]
    hit = (counts > 0) & (counts <= limit)
    return sorted(int(d) for d in np.flatnonzero(hit.any(0)))


def sink_phi(hidden: torch.Tensor, dims: Sequence[int]) -> torch.Tensor:
    """``phi(x) = max_{d in dims} |x_d / rms(x)|`` (Kang et al. 2025): float ``[..., dim]`` -> float32 ``[...]``
    (0 where ``dims`` is empty: no massive dimension, no sink)."""
    if not len(dims):
        return torch.zeros(hidden.shape[:-1], dtype=torch.float32, device=hidden.device)
    idx = torch.as_tensor(list(dims), dtype=torch.long, device=hidden.device)
    return rms_normalized(hidden).index_select(-1, idx).abs().amax(-1)


def head_divergence(with_image: torch.Tensor, without_image: torch.Tensor) -> torch.Tensor:
    """VHD (He et al. 2025, Eq. 4): ``|| o_h(with image) - o_h(without) ||_2`` per head.

    Args:
        with_image / without_image: float ``[..., head, head_dim]`` head outputs at matching positions.

    Returns:
        float32 ``[..., head]``.
    """
    return torch.linalg.vector_norm(with_image.float() - without_image.float(), dim=-1)


def token_vhd(vhd: np.ndarray, top_k: int) -> np.ndarray:
    """T-VHD (He et al. 2025): sum over layers of the ``top_k`` largest VHDs of each layer.

    Args:
        vhd: float ``[layer, head, token]``.

    Returns:
        float32 ``[token]``.
    """
    v = np.asarray(vhd, np.float64)
    k = max(1, min(int(top_k), v.shape[1]))
    top = -np.sort(-v, axis=1)[:, :k]  # [layer, k, token]
    return top.sum((0, 1)).astype(np.float32)


def reinforcement_gates(vhd: np.ndarray, alpha: float) -> np.ndarray:
    """VHR-style gates: ``alpha`` for every head whose VHD lies above its layer's median, else 1.

    Args:
        vhd: float ``[..., layer, head]``.

    Returns:
        float32 of the same shape.
    """
    v = np.asarray(vhd, np.float64)
    median = np.median(v, axis=-1, keepdims=True)
    return np.where(v > median, float(alpha), 1.0).astype(np.float32)


# -- options --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LvlmOptions:
    """The family's options (``ExtractOptions.family_options``; CLI flags in brackets).

    Attributes:
        max_new_tokens: answer tokens generated at most (``--max-new-tokens``).
        answer_rows_only: record only the language model's attention rows of the generation steps
            (``--answer-rows-only``).
        vhd: measure VHD with the image-free forward (``--vhd/--no-vhd``).
        vhd_top_k: k of T-VHD (``--vhd-top-k``).
        sinks: record the sink statistic phi (``--sinks/--no-sinks``).
        sink_tau: tau of the sink tokens and massive dimensions (``--sink-tau``).
        sink_calibration: questions whose hidden states decide the massive dimensions, the first ones
            (``--sink-calibration``; 0 = all).
        reinforce: alpha of the VHR-style reinforcement, or None for none (``--reinforce``).
    """

    max_new_tokens: int = 16
    answer_rows_only: bool = False
    vhd: bool = True
    vhd_top_k: int = 2
    sinks: bool = True
    sink_tau: float = 20.0
    sink_calibration: int = 64
    reinforce: float | None = None

    @classmethod
    def parse(cls, options: dict[str, Any]) -> LvlmOptions:
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(options) - known)
        if unknown:
            raise InputError(f"option(s) {', '.join(unknown)} do not apply to a vision-language (lvlm) model; "
                             f"it takes: {', '.join(sorted(known))}")
        o = cls(**options)
        if int(o.max_new_tokens) < 1:
            raise InputError(f"--max-new-tokens must be at least 1, got {o.max_new_tokens}")
        if int(o.vhd_top_k) < 1:
            raise InputError(f"--vhd-top-k must be at least 1, got {o.vhd_top_k}")
        if not float(o.sink_tau) > 0:
            raise InputError(f"--sink-tau must be positive, got {o.sink_tau}")
        if int(o.sink_calibration) < 0:
            raise InputError(f"--sink-calibration must be 0 (all) or more, got {o.sink_calibration}")
        if o.reinforce is not None and not float(o.reinforce) > 0:
            raise InputError(f"--reinforce must be a positive scale (e.g. 2.0), got {o.reinforce}")
        if o.reinforce is not None and not o.vhd:
            raise InputError("--reinforce chooses heads by their VHD: it needs --vhd")
        return o


@dataclass
class VQABatch(PreparedBatch):
    """A prepared batch of questions: ``inputs`` holds ``input_ids``/``attention_mask`` (left-padded for
    generation) and ``pixel_values``; ``items`` the questions, ``texts`` the prompts as the model reads them."""

    items: tuple[VQAInput, ...] = ()
    texts: tuple[str, ...] = ()


@dataclass
class _Plan:
    """What :meth:`LvlmAdapter.plan` finds out from all inputs."""

    max_prompt: int
    image_span: tuple[int, int] | None
    sink_dims: list[int] = field(default_factory=list)
    sink_counts: dict[int, int] = field(default_factory=dict)
    calibration_tokens: int = 0
    calibration_questions: int = 0
    answer_index: dict[str, int] = field(default_factory=dict)


# -- the adapter ----------------------------------------------------------------------------------------


@register_adapter
class LvlmAdapter(Adapter):
    """Adapter for ``LlavaForConditionalGeneration`` (see the module docstring).

    Stacks: ``"self"`` (language model; ``[batch, layer, head, query, key]`` over the token sequence
    prompt + answer, padded, or the generation-step rows only) and ``"vision"`` (the tower, CLS + patches).
    """

    name = "lvlm"
    input_kind = "image+prompt"
    default_attributions = ()
    writes_meta = True
    input_noun = "question"
    supports_qk = False  # query/key vectors are for image stacks recorded whole

    def __init__(self, *, processor: Any, vision: Any, options: LvlmOptions, **kw: Any) -> None:
        super().__init__(**kw)
        from extractor.hooks import find_output_projections

        self.processor = processor
        self.tokenizer = processor.tokenizer
        self.options = options
        self.vision = vision  # a VitAdapter over the tower: its layout, thumbnails and masks
        self.thumbnail_size = vision.thumbnail_size
        text = self.config.text_config
        self.n_layers = int(text.num_hidden_layers)
        self.n_heads = int(text.num_attention_heads)
        self.hidden_size = int(text.hidden_size)
        self.max_positions = int(getattr(text, "max_position_embeddings", 0) or 0)
        self.image_token_id = int(self.config.image_token_id)
        self.image_token = str(processor.image_token)
        self.n_image_tokens = _image_feature_count(self.config, vision.layout)
        self.lm_sites = find_output_projections(self.model, self.arch.stack("self").pattern("output_projection"),
                                                n_heads=self.n_heads)
        self.eos_ids = _eos_ids(self.model, self.tokenizer)
        self.pad_id = _pad_id(self.tokenizer, self.eos_ids)
        self._plan: _Plan | None = None

    # -- loading -----------------------------------------------------------------------------

    @classmethod
    def load(cls, source: ModelSource, config: Any, arch: ArchitectureSpec, *, device: torch.device,
             autocast_dtype: torch.dtype | None, **options: Any) -> LvlmAdapter:
        """Load the model, its processor (image processor, tokenizer, chat template) and the tower's view.

        Raises:
            InputError: an option this family does not take, or a bad value.
            ModelError: weights, processor or tokenizer missing or unreadable; the processor's image-token
                count disagrees with the vision tower.
        """
        import transformers

        from extractor.adapters.vit import VitAdapter, _fixed_input_size
        from extractor.loading import guarded, load_pretrained

        if "image_size" in options:
            raise InputError("--image-size does not apply to a lvlm model: a LLaVA model reads images at its own "
                             "processor's size (leave out --image-size)")
        opts = LvlmOptions.parse(options)
        model = load_pretrained(getattr(transformers, arch.model_class), source.path, source.ref,
                                attn_implementation="eager")
        model.set_attn_implementation("eager")  # both sub-configs: attention weights come back only so
        model.eval().to(device)
        with guarded("the processor (image processor + tokenizer) saved with the model", source.ref,
                     "; save it with processor.save_pretrained(dir)"):
            processor = transformers.AutoProcessor.from_pretrained(source.path, local_files_only=True, backend="pil")
        if getattr(processor, "tokenizer", None) is None or getattr(processor, "image_processor", None) is None:
            raise ModelError(f"{source.ref}: the saved processor has no tokenizer or no image processor")
        token_id = getattr(processor, "image_token_id", None)
        if token_id is None or int(token_id) != int(config.image_token_id):
            raise ModelError(f"{source.ref}: the processor's image token id {token_id} differs from the model's "
                             f"image_token_id {config.image_token_id}")
        processor.tokenizer.padding_side = "left"  # generation continues every row at its end
        vision_config = arch.vision(config)
        tower_row = _tower_row(vision_config)
        image_processor = processor.image_processor
        vision = VitAdapter(model=model.model.vision_tower, config=vision_config, arch=tower_row, source=source,
                            device=device, autocast_dtype=autocast_dtype, processor=image_processor,
                            input_size=_fixed_input_size(image_processor, source))
        adapter = cls(model=model, config=config, arch=arch, source=source, device=device,
                      autocast_dtype=autocast_dtype, processor=processor, vision=vision, options=opts)
        adapter._check_image_tokens()
        if opts.sinks and opts.sink_tau >= math.sqrt(adapter.hidden_size):
            print(f"warning: --sink-tau {opts.sink_tau:g} cannot be reached: phi <= sqrt(hidden size) = "
                  f"{math.sqrt(adapter.hidden_size):.1f} for this language model, so no token will be a sink",
                  file=sys.stderr)
        return adapter

    def _check_image_tokens(self) -> None:
        """The processor must expand one image placeholder into as many tokens as the projector gives."""
        from PIL import Image

        probe = self.processor(text=[self.image_token], images=[Image.new("RGB", (37, 53), (127, 127, 127))],
                               return_tensors="np")
        n = int((probe["input_ids"][0] == self.image_token_id).sum())
        if n != self.n_image_tokens:
            raise ModelError(
                f"{self.source.ref}: the processor expands the image placeholder into {n} image tokens, the vision "
                f"tower gives {self.n_image_tokens} features ({self.vision.layout.grid[0]}x{self.vision.layout.grid[1]} "
                f"patches, vision_feature_select_strategy={self.config.vision_feature_select_strategy!r}); check the "
                "processor's patch_size, num_additional_image_tokens and vision_feature_select_strategy")

    # -- description -------------------------------------------------------------------------

    @property
    def class_names(self) -> list[str]:
        return []

    def stacks(self) -> list[StackSpec]:
        plan = self._require_plan()
        n_tokens = plan.max_prompt + self.options.max_new_tokens
        rows = self.options.max_new_tokens if self.options.answer_rows_only else n_tokens
        lm = TokenLayout(query_axis=ANSWER_STEPS if self.options.answer_rows_only else "tokens",
                         key_axis="tokens", image_span=plan.image_span)
        vis = self.vision.stack("self")
        return [StackSpec("self", self.n_layers, self.n_heads, rows, n_tokens, lm),
                StackSpec("vision", vis.n_layers, vis.n_heads, vis.max_query, vis.max_key, vis.layout)]

    def per_sample_specs(self) -> list[PerSampleSpec]:
        plan = self._require_plan()
        n_tokens = plan.max_prompt + self.options.max_new_tokens
        g = self.options.max_new_tokens
        out = [
            PerSampleSpec("image_span", (2,), "int32", ("bound",),
                          "positions [start, stop) of the image tokens in the language model's token sequence"),
            PerSampleSpec("answer_span", (2,), "int32", ("bound",),
                          "positions [start, stop) of the generated answer tokens (start = prompt length)"),
        ]
        if self.options.vhd:
            out += [
                PerSampleSpec("vhd", (self.n_layers, self.n_heads, g), "float32", ("layer", "head", "answer_token"),
                              "vision-aware head divergence (He et al. 2025, Eq. 4) of each head at the generation "
                              "step of each answer token: ||o(with image) - o(without)||_2 of its o_proj input slice"),
                PerSampleSpec("t_vhd", (g,), "float32", ("answer_token",),
                              f"T-VHD (He et al. 2025): sum over layers of the top-{self.options.vhd_top_k} VHDs "
                              "of each answer token"),
            ]
        if self.options.sinks:
            out.append(PerSampleSpec("sink_phi", (self.n_layers, n_tokens), "float16", ("layer", "token"),
                                     "phi_l(x) = max over the massive dimensions of |x_d / rms(x)| of the hidden "
                                     "state entering layer l (Kang et al. 2025); sinks: image tokens with phi > tau"))
        return out

    def extra_params(self) -> dict[str, Any]:
        plan = self._require_plan()
        o = self.options
        return {"image_token_id": self.image_token_id, "n_image_tokens": self.n_image_tokens,
                "image_grid_offset": self.n_image_tokens - self.vision.layout.n_patches,
                "hidden_size": self.hidden_size, "eos_token_ids": self.eos_ids,
                "sink_tau": float(o.sink_tau), "sink_dims": plan.sink_dims if o.sinks else None,
                "sink_dim_counts": {str(k): v for k, v in plan.sink_counts.items()} if o.sinks else None,
                "sink_max_share": SINK_MAX_SHARE, "sink_calibration_questions": plan.calibration_questions,
                "sink_calibration_tokens": plan.calibration_tokens, "vhd_top_k": int(o.vhd_top_k),
                "reinforce": o.reinforce, "answer_rows_only": bool(o.answer_rows_only),
                "max_new_tokens": int(o.max_new_tokens)}

    # -- planning ----------------------------------------------------------------------------

    def prompt_text(self, item: VQAInput) -> str:
        """The prompt as the model reads it: the question in the model's chat template (which adds the
        image placeholder), or the question itself when it already holds the placeholder.

        Raises:
            InputError: no placeholder and no chat template to add one.
        """
        where = f"line {item.line}" if item.line else item.id
        if self.image_token in item.prompt:
            return item.prompt
        template = getattr(self.processor, "chat_template", None) or getattr(self.tokenizer, "chat_template", None)
        if not template:
            raise InputError(f"{where}: the prompt has no {self.image_token} placeholder and {self.source.ref} has no "
                             f"chat template to add one; write the prompt with {self.image_token} where the image goes")
        messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": item.prompt}]}]
        try:
            text = self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # noqa: BLE001 - a user's template can fail in many ways
            raise InputError(f"{where}: the model's chat template failed on this prompt ({_first_line(e)})") from None
        if self.image_token not in text:
            raise InputError(f"{where}: the model's chat template did not add the {self.image_token} placeholder; "
                             f"write the prompt with {self.image_token} where the image goes")
        return text

    def plan(self, items: Sequence[VQAInput]) -> None:
        """Check every prompt (one image, fits the language model) and size the stacks; decide the massive
        dimensions from the first ``sink_calibration`` questions (one prompt-only forward each).

        Raises:
            InputError: naming the question: a prompt whose image-token count differs from the vision
                tower's, or that is too long for the language model with ``max_new_tokens``.
        """
        from PIL import Image

        gray = Image.new("RGB", (37, 53), (127, 127, 127))
        lengths: dict[str, tuple[int, tuple[int, int] | None, int]] = {}
        spans = set()
        for it in items:
            where = f"line {it.line}" if it.line else it.id
            text = self.prompt_text(it)
            if text not in lengths:
                n_placeholders = text.count(self.image_token)
                try:
                    ids = self.processor(text=[text], images=[gray], return_tensors="np")["input_ids"][0]
                except (ValueError, IndexError) as e:  # the processor refuses placeholders without images
                    raise InputError(f"{where}: the prompt holds {n_placeholders} {self.image_token} placeholders for "
                                     f"one image ({_first_line(e)}); one {self.image_token} per question") from None
                lengths[text] = (len(ids), _image_span(ids, self.image_token_id),
                                 int((ids == self.image_token_id).sum()))
            n, span, n_image = lengths[text]
            if span is None or n_image != self.n_image_tokens:
                raise InputError(f"{where}: the prompt holds {text.count(self.image_token)} {self.image_token} "
                                 f"placeholder(s), {n_image} image tokens after processing"
                                 f"{'' if span or not n_image else ', not in one run'}; the vision tower gives "
                                 f"{self.n_image_tokens} features for the one image of a question")
            if self.max_positions and n + self.options.max_new_tokens > self.max_positions:
                raise InputError(f"{where}: the prompt is {n} tokens; with --max-new-tokens "
                                 f"{self.options.max_new_tokens} it exceeds the language model's "
                                 f"{self.max_positions} positions (shorten the prompt or lower --max-new-tokens)")
            spans.add(span)
        answers = {normalize_answer(it.answer): it.label for it in items if it.answer is not None and it.label >= 0}
        self._plan = _Plan(max_prompt=max(n for n, _, _ in lengths.values()),
                           image_span=spans.pop() if len(spans) == 1 else None, answer_index=answers)
        if self.options.sinks:
            n_cal = len(items) if self.options.sink_calibration == 0 else min(len(items), self.options.sink_calibration)
            self._calibrate_sinks(items[:n_cal])

    def _calibrate_sinks(self, items: Sequence[VQAInput], batch_size: int = 16) -> None:
        """Count, per layer and dimension, the prompt tokens with ``|x_d / rms(x)| > tau``; the massive
        dimensions follow (:func:`massive_dimensions`)."""
        tau = float(self.options.sink_tau)
        counts = np.zeros((self.n_layers, self.hidden_size), np.int64)
        totals = np.zeros(self.n_layers, np.int64)
        with torch.no_grad():
            for start in range(0, len(items), batch_size):
                batch = self.prepare(items[start:start + batch_size])
                inp = {k: v.to(self.device) for k, v in batch.inputs.items()}
                with autocast(self.device, self.autocast_dtype):
                    out = self.model(**inp, output_hidden_states=True, use_cache=False)
                valid = inp["attention_mask"].bool()  # [b, seq]
                for layer in range(self.n_layers):
                    big = rms_normalized(out.hidden_states[layer]).abs() > tau  # [b, seq, dim]
                    counts[layer] += (big & valid[..., None]).sum((0, 1)).cpu().numpy()
                    totals[layer] += int(valid.sum())
        dims = massive_dimensions(counts, totals)
        plan = self._require_plan()
        plan.sink_dims = dims
        plan.sink_counts = {d: int(counts[:, d].max()) for d in dims}
        plan.calibration_tokens = int(totals[0]) if len(totals) else 0
        plan.calibration_questions = len(items)

    def _require_plan(self) -> _Plan:
        if self._plan is None:
            raise ModelError("the lvlm adapter sizes its stacks from the questions: call plan(items) first")
        return self._plan

    # -- per batch ---------------------------------------------------------------------------

    def prepare(self, items: Sequence[VQAInput]) -> VQABatch:
        """Read the images, template the prompts, run the processor (CPU; no model access).

        Returns:
            inputs ``input_ids``/``attention_mask`` int ``[batch, seq]`` (left-padded), ``pixel_values``
            float ``[batch, 3, h, w]``; thumbnails uint8 ``[batch, th, tw, 3]``; masks when any item has one.
        """
        images = read_images(items)
        texts = tuple(self.prompt_text(it) for it in items)
        enc = self.processor(text=list(texts), images=images, padding=True, return_tensors="pt")
        px = enc["pixel_values"]
        thumbs = self.vision._thumbnails(px.numpy())
        masks = np.stack([self.vision._mask(it) for it in items]) if any(it.mask is not None for it in items) else None
        return VQABatch(inputs={"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"],
                                "pixel_values": px},
                        labels=np.array([it.label for it in items], np.int32), thumbnails=thumbs, masks=masks,
                        items=tuple(items), texts=texts)

    def run(self, batch: VQABatch) -> BatchOutput:
        """Generate, then the teacher-forced pass (attention, sinks), the image-free pass (VHD) and the
        optional reinforced generation, for one batch (caller holds ``torch.no_grad()``)."""
        o = self.options
        inp = {k: v.to(self.device) for k, v in batch.inputs.items()}
        b = inp["input_ids"].shape[0]
        prompts = [row[m.bool()].tolist() for row, m in zip(inp["input_ids"].cpu(), inp["attention_mask"].cpu())]
        generated = self._generate(inp)
        sequences = [p + g for p, g in zip(prompts, generated)]
        spans = [_image_span(np.asarray(p), self.image_token_id) for p in prompts]
        # generation step of answer token j: position len(prompt) - 1 + j
        steps = [np.arange(len(p) - 1, len(p) - 1 + len(g)) for p, g in zip(prompts, generated)]

        ids, mask = self._right_padded(sequences)
        with self._capture_heads(o.vhd) as heads_with:
            with autocast(self.device, self.autocast_dtype):
                out = self.model(input_ids=ids, attention_mask=mask, pixel_values=inp["pixel_values"],
                                 output_attentions=True, output_hidden_states=o.sinks, use_cache=False)
            outputs_with = {layer: heads_with[layer].float() for layer in range(self.n_layers)} if o.vhd else {}
        lm_maps, lm_lengths = self._lm_maps(out.attentions, sequences, steps)
        vision_maps = self._vision_maps(out)
        per_sample: dict[str, np.ndarray] = {
            "image_span": np.array([list(s) for s in spans], np.int32),
            "answer_span": np.array([[len(p), len(p) + len(g)] for p, g in zip(prompts, generated)], np.int32),
        }
        if o.sinks:
            dims = self._require_plan().sink_dims
            phi = torch.stack([sink_phi(out.hidden_states[layer], dims) for layer in range(self.n_layers)], 1)
            phi = phi * mask[:, None, :].float()  # [b, layer, seq]; padding 0
            per_sample["sink_phi"] = phi.cpu().numpy().astype(np.float16)
        vhd = None
        if o.vhd:
            vhd = self._vhd(sequences, spans, steps, outputs_with)  # [b, layer, head, g] (NaN padded)
            per_sample["vhd"] = np.nan_to_num(vhd, nan=0.0)
            t_vhd = np.zeros((b, int(o.max_new_tokens)), np.float32)
            for i, g in enumerate(generated):
                t_vhd[i, : len(g)] = token_vhd(vhd[i, :, :, : len(g)], o.vhd_top_k)
            per_sample["t_vhd"] = t_vhd
        reinforced = None
        if o.reinforce is not None and vhd is not None:
            gates = reinforcement_gates(vhd[..., 0], float(o.reinforce))  # [b, layer, head] at the first step
            reinforced = (gates, self._generate(inp, gates=torch.from_numpy(gates)))
        meta, predictions = self._meta(batch, prompts, generated, spans, per_sample, reinforced)
        return BatchOutput(attention={"self": lm_maps, "vision": vision_maps}, logits=None,
                           lengths={"self": lm_lengths}, predictions=predictions, meta=meta, per_sample=per_sample)

    # -- the passes --------------------------------------------------------------------------

    def _generate(self, inp: dict[str, torch.Tensor], gates: torch.Tensor | None = None) -> list[list[int]]:
        """Greedy answers (up to and including the first end-of-sequence token), optionally with heads scaled
        by ``gates`` float ``[batch, layer, head]``."""
        import contextlib

        from extractor.hooks import scale_heads

        ctx = scale_heads(self.lm_sites, gates.to(self.device)) if gates is not None else contextlib.nullcontext()
        width = inp["input_ids"].shape[1]
        with ctx, autocast(self.device, self.autocast_dtype):
            # an image token in an answer would ask the teacher-forced pass for a second image
            seqs = self.model.generate(**inp, max_new_tokens=int(self.options.max_new_tokens), do_sample=False,
                                       num_beams=1, pad_token_id=self.pad_id, eos_token_id=self.eos_ids,
                                       suppress_tokens=[self.image_token_id])
        out = []
        for row in seqs[:, width:].tolist():
            cut = next((i for i, t in enumerate(row) if t in self.eos_ids), None)
            out.append(row[: cut + 1] if cut is not None else row)
        return out

    def _right_padded(self, sequences: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """int ``[batch, longest]`` ids and attention mask, padded on the right: real tokens keep positions
        0..n-1, and causal attention never lets them see the padding."""
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for i, s in enumerate(sequences):
            ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
            mask[i, : len(s)] = 1
        return ids.to(self.device), mask.to(self.device)

    def _capture_heads(self, enabled: bool) -> Any:
        import contextlib

        from extractor.hooks import capture_head_outputs

        return capture_head_outputs(self.lm_sites) if enabled else contextlib.nullcontext({})

    def _lm_maps(self, attentions: Sequence[torch.Tensor], sequences: list[list[int]],
                 steps: list[np.ndarray]) -> tuple[torch.Tensor, np.ndarray]:
        """The language model's maps as stored: float16 ``[batch, layer, head, rows, keys]`` and the valid
        (rows, keys) per sample (all positions, or the generation steps only)."""
        if not attentions:
            raise ModelError(f"{self.model_class} returned no language-model attention (is eager attention set?)")
        b = len(sequences)
        keys = max(len(s) for s in sequences)
        if not self.options.answer_rows_only:
            maps = torch.empty((b, self.n_layers, self.n_heads, keys, keys), dtype=torch.float16,
                               device=attentions[0].device)
            for layer, a in enumerate(attentions):
                maps[:, layer].copy_(a)
            # rows of padding positions are not part of any sample: zero, as the format wants
            for i, s in enumerate(sequences):
                maps[i, :, :, len(s):] = 0
            return maps, np.array([[len(s), len(s)] for s in sequences], np.int32)
        rows = max(len(st) for st in steps)
        maps = torch.zeros((b, self.n_layers, self.n_heads, rows, keys), dtype=torch.float16,
                           device=attentions[0].device)
        for i, st in enumerate(steps):
            idx = torch.as_tensor(st, device=attentions[0].device)
            for layer, a in enumerate(attentions):
                maps[i, layer, :, : len(st)] = a[i].index_select(1, idx)
        return maps, np.array([[len(st), len(s)] for st, s in zip(steps, sequences)], np.int32)

    def _vision_maps(self, out: Any) -> torch.Tensor:
        """The tower's maps float16 ``[batch, layer, head, tokens, tokens]`` (CLS + patches)."""
        image_outputs = getattr(out, "image_outputs", None)
        attentions = getattr(image_outputs, "attentions", None)
        if not attentions:
            raise ModelError(f"{self.model_class} returned no vision-tower attention (is eager attention set on "
                             "the vision sub-config?)")
        t = self.vision.layout.n_tokens
        if attentions[0].shape[-1] != t:
            raise ModelError(f"the vision tower has {attentions[0].shape[-1]} tokens, expected {t} = "
                             f"{self.vision.layout.n_prefix} prefix + {self.vision.layout.n_patches} patches")
        maps = torch.empty((attentions[0].shape[0], len(attentions), *attentions[0].shape[1:]), dtype=torch.float16,
                           device=attentions[0].device)
        for layer, a in enumerate(attentions):
            maps[:, layer].copy_(a)
        return maps

    def _vhd(self, sequences: list[list[int]], spans: list[tuple[int, int]], steps: list[np.ndarray],
             outputs_with: dict[int, torch.Tensor]) -> np.ndarray:
        """VHD of every head at every generation step: the image-free forward of the same sequences without
        their image tokens, batched. Returns float32 ``[batch, layer, head, max_new_tokens]`` (NaN padded)."""
        from extractor.hooks import capture_head_outputs

        text_only = [s[: a] + s[e:] for s, (a, e) in zip(sequences, spans)]
        ids, mask = self._right_padded(text_only)
        with capture_head_outputs(self.lm_sites) as heads_without:
            with autocast(self.device, self.autocast_dtype):
                self.model(input_ids=ids, attention_mask=mask, use_cache=False)
            outputs_without = {layer: heads_without[layer].float() for layer in range(self.n_layers)}
        g = int(self.options.max_new_tokens)
        vhd = np.full((len(sequences), self.n_layers, self.n_heads, g), np.nan, np.float32)
        for i, ((a, e), st) in enumerate(zip(spans, steps)):
            pos = torch.as_tensor(st, device=ids.device)
            for layer in range(self.n_layers):
                w = outputs_with[layer][i].index_select(0, pos)  # [steps, head, head_dim]
                wo = outputs_without[layer][i].index_select(0, pos - (e - a))
                vhd[i, layer, :, : len(st)] = head_divergence(w, wo).T.cpu().numpy()
        return vhd

    def _meta(self, batch: VQABatch, prompts: list[list[int]], generated: list[list[int]],
              spans: list[tuple[int, int]], per_sample: dict[str, np.ndarray],
              reinforced: tuple[np.ndarray, list[list[int]]] | None) -> tuple[list[dict[str, Any]], np.ndarray]:
        tok = self.tokenizer
        answers = self._require_plan().answer_index
        meta, predictions = [], np.full(len(prompts), -1, np.int32)
        for i, (it, p, g) in enumerate(zip(batch.items, prompts, generated)):
            text = self._answer_text(g)
            predictions[i] = answers.get(normalize_answer(text), -1)
            m: dict[str, Any] = {
                "prompt": it.prompt, "text": batch.texts[i], "answer": it.answer, "generated": text,
                "generated_ids": g, "generated_tokens": tok.convert_ids_to_tokens(g),
                "tokens": tok.convert_ids_to_tokens(p + g), "image_span": list(spans[i]),
                "answer_span": [len(p), len(p) + len(g)],
                "correct": None if it.answer is None else normalize_answer(text) == normalize_answer(it.answer),
            }
            if "t_vhd" in per_sample:
                m["t_vhd"] = [round(float(v), 5) for v in per_sample["t_vhd"][i, : len(g)]]
            if reinforced is not None:
                gates, regen = reinforced
                rtext = self._answer_text(regen[i])
                m["reinforced"] = {
                    "alpha": float(self.options.reinforce), "generated": rtext, "generated_ids": regen[i],
                    "generated_tokens": tok.convert_ids_to_tokens(regen[i]),
                    "heads": [[int(l), int(h)] for l, h in zip(*np.nonzero(gates[i] != 1.0))],
                    "correct": None if it.answer is None else normalize_answer(rtext) == normalize_answer(it.answer),
                    "changed": rtext != text,
                }
            meta.append(m)
        return meta, predictions

    def _answer_text(self, ids: list[int]) -> str:
        body = [t for t in ids if t not in self.eos_ids]
        return self.tokenizer.decode(body, skip_special_tokens=True).strip()

    # -- what this family does not do ----------------------------------------------------------

    def logits_fn(self) -> Callable[[Any], Any]:
        raise ModelError(f"{self.model_class}: {_NO_IMPORTANCE}")

    def embedding_fn(self) -> Callable[[Any], Any]:
        raise ModelError(f"{self.model_class}: {_NO_IMPORTANCE}")

    def after_recording(self, path: Any) -> list[str]:
        """The family's head metrics into the finished file (:func:`attnviz.analysis.lvlm.analyze_step`)."""
        from attnviz.analysis.lvlm import analyze_step

        return analyze_step(path)


# -- helpers ----------------------------------------------------------------------------------------


def _tower_row(vision_config: Any) -> ArchitectureSpec:
    """The ``vit`` table row of the tower's own model type (CLIP: CLS + patches; SigLIP: patches only)."""
    model_type = getattr(vision_config, "model_type", None)
    for row in ARCHITECTURES:
        if row.family == "vit" and row.model_type == model_type and row.default_for_type and row.vision_config is None:
            return row
    raise ModelError(f"vision tower of type {model_type!r} is not in the architecture table; supported towers: "
                     + ", ".join(sorted({r.model_type for r in ARCHITECTURES if r.family == 'vit'})))


def _image_feature_count(config: Any, layout: TokenLayout) -> int:
    """Image tokens the projector gives for one image: the patches, plus CLS with the "full" strategy."""
    strategy = getattr(config, "vision_feature_select_strategy", "default")
    return layout.n_patches + (layout.n_prefix if strategy == "full" else 0)


def _image_span(ids: np.ndarray, image_token_id: int) -> tuple[int, int] | None:
    """[start, stop) of the image tokens when they are one contiguous run, else None."""
    where = np.flatnonzero(np.asarray(ids) == image_token_id)
    if not len(where) or where[-1] - where[0] + 1 != len(where):
        return None
    return int(where[0]), int(where[-1]) + 1


def _eos_ids(model: Any, tokenizer: Any) -> list[int]:
    eos = getattr(model.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    if eos is None:
        raise ModelError("the model has no end-of-sequence token (generation_config.eos_token_id or the "
                         "tokenizer's eos_token)")
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]


def _pad_id(tokenizer: Any, eos_ids: list[int]) -> int:
    return int(tokenizer.pad_token_id) if tokenizer.pad_token_id is not None else int(eos_ids[0])


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__
