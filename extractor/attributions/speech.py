"""What the speech attribution methods share: one clip under forced decoding, random time-frequency masks,
the KL divergence score, and the entry point :func:`compute_speech`.

A speech-to-text model's output is a token sequence ``y_1..y_n``; every method explains each *row* of it
separately under **forced decoding** (teacher forcing): the decoder is fed the recorded sequence
``[y_0, ..., y_{n-1}]`` (``y_0`` the decoder start token, then the prompt and the generated tokens) and row
``t`` is the step that predicts ``y_{t+1}``, so a perturbed input changes only the distributions, never the
tokens being explained. The shapes below use ``T`` rows (tokens), ``F`` input feature frames that hold audio
(of the model's fixed window of ``F_window``), ``M`` mel bins and ``E`` encoder frames that hold audio.

Nothing here imports torch or captum at import time (the registry is listed without them).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterator, Sequence

import numpy as np

from extractor.attributions.base import get

if TYPE_CHECKING:  # pragma: no cover
    import torch

__all__ = ["ForcedDecoding", "compute_speech", "random_masks", "kl_rows", "hidden_mean_scores", "sdpa_attention",
           "DEFAULT_SCALES"]

#: perturbation cell sizes as (fraction of the mel axis, feature frames): 1/8 x 50 ms up to the whole
#: band x 400 ms; a mask of one scale hides a random subset of the cells of a randomly shifted grid
DEFAULT_SCALES: tuple[tuple[float, int], ...] = ((0.125, 5), (0.25, 10), (0.5, 20), (1.0, 40))


@contextmanager
def sdpa_attention(model: Any) -> Iterator[None]:
    """Run ``model`` with PyTorch's scaled-dot-product attention inside the block, eager again after it.

    The recording needs eager attention (it returns the attention probabilities); the saliency passes do
    not, and SDPA computes the same function without materialising ``[batch, head, 1500, 1500]`` maps:
    several times faster and lighter on a CPU for a full Whisper window.
    """
    config = getattr(model, "config", None)
    before = getattr(config, "_attn_implementation", None)
    if before is None or not hasattr(model, "set_attn_implementation"):  # not a transformers model
        yield
        return
    try:
        model.set_attn_implementation("sdpa")
    except (ValueError, AttributeError):  # a model without SDPA support: stay eager
        yield
        return
    try:
        yield
    finally:
        model.set_attn_implementation(before)


@dataclass
class ForcedDecoding:
    """One clip and the token sequence its attributions explain.

    Attributes:
        model: a ``WhisperForConditionalGeneration``-like encoder-decoder (eval mode).
        features: float ``[1, M, F_window]`` on the model's device: the clip's input features.
        decoder_input_ids: long ``[1, T]``: the decoder input of forced decoding (start token, prompt,
            generated tokens but the last).
        targets: long ``[T]``: the token each row predicts (``decoder_input_ids`` shifted by one).
        n_frames: feature frames that hold audio (``F``); the rest of the window is padding.
        n_encoder_frames: encoder frames that hold audio (``E``).
        autocast_dtype: forward dtype on a GPU, or None.
    """

    model: Any
    features: Any
    decoder_input_ids: Any
    targets: Any
    n_frames: int
    n_encoder_frames: int
    autocast_dtype: Any = None

    @property
    def n_rows(self) -> int:
        return int(self.targets.shape[0])

    @property
    def device(self) -> Any:
        return self.features.device

    def logprobs(self, features: torch.Tensor) -> torch.Tensor:
        """Forced decoding of perturbed copies of the clip.

        Args:
            features: float ``[N, M, F_window]``.

        Returns:
            float32 ``[N, T, vocab]``: log-softmax of the logits of every row (differentiable).
        """
        from extractor.device import autocast

        n = int(features.shape[0])
        with autocast(self.device, self.autocast_dtype):
            logits = self.model(input_features=features, decoder_input_ids=self.decoder_input_ids.expand(n, -1),
                                use_cache=False).logits
        return logits.float().log_softmax(-1)

    def token_logprobs(self, features: torch.Tensor) -> torch.Tensor:
        """float32 ``[N, T]``: ``log p(y_{t+1} | y_<=t, X)`` of every row's own token (differentiable)."""
        lp = self.logprobs(features)
        return lp.gather(-1, self.targets.view(1, -1, 1).expand(lp.shape[0], -1, 1)).squeeze(-1)

    def encoder_hidden(self) -> torch.Tensor:
        """float ``[1, E_window, d_model]``: the encoder's output for the unperturbed clip."""
        from extractor.device import autocast

        with autocast(self.device, self.autocast_dtype):
            return self.model.get_encoder()(self.features).last_hidden_state

    def logprobs_from_encoder(self, hidden: torch.Tensor) -> torch.Tensor:
        """Forced decoding from (perturbed) encoder outputs ``hidden`` float ``[N, E_window, d_model]``:
        float32 ``[N, T, vocab]`` log-softmax."""
        from transformers.modeling_outputs import BaseModelOutput

        from extractor.device import autocast

        n = int(hidden.shape[0])
        with autocast(self.device, self.autocast_dtype):
            logits = self.model(encoder_outputs=BaseModelOutput(last_hidden_state=hidden),
                                decoder_input_ids=self.decoder_input_ids.expand(n, -1), use_cache=False).logits
        return logits.float().log_softmax(-1)


def kl_rows(reference: torch.Tensor, perturbed: torch.Tensor) -> torch.Tensor:
    """``KL(p || q)`` per row, ``sum_v p_v (log p_v - log q_v)``.

    Args:
        reference: float ``[T, vocab]`` (or broadcastable), log-probabilities ``log p`` of the unperturbed input.
        perturbed: float ``[N, T, vocab]``, log-probabilities ``log q``.

    Returns:
        float ``[N, T]``, >= 0.
    """
    p = reference.exp()
    return (p * (reference - perturbed)).sum(-1).clamp_min(0.0)


def random_masks(rng: np.random.Generator, n_masks: int, n_mel: int, n_frames: int,
                 scales: Sequence[tuple[float, int]], p_hide: float) -> np.ndarray:
    """Random multi-scale time-frequency masks.

    Mask ``k`` uses scale ``scales[k % len(scales)] = (mel_fraction, frames)``: a grid of cells of
    ``ceil(mel_fraction * n_mel)`` mel bins by ``frames`` feature frames, shifted by a random offset in both
    directions (so cell edges fall anywhere; a cell of the whole band is not shifted along mel), each cell hidden
    independently with probability ``p_hide``.

    Returns:
        bool ``[n_masks, n_mel, n_frames]``, True = hidden.
    """
    out = np.zeros((n_masks, n_mel, n_frames), bool)
    for k in range(n_masks):
        frac, width = scales[k % len(scales)]
        height = max(1, int(np.ceil(frac * n_mel)))
        width = max(1, int(width))
        # a cell as tall as the band stays the whole band (a shift would cut it in two)
        off_m = int(rng.integers(height)) if height < n_mel else 0
        off_t = int(rng.integers(width))
        rows = (np.arange(n_mel) + off_m) // height
        cols = (np.arange(n_frames) + off_t) // width
        cells = rng.random((int(rows[-1]) + 1, int(cols[-1]) + 1)) < p_hide
        out[k] = cells[rows][:, cols]
    return out


def hidden_mean_scores(scores: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """The perturbation estimator shared by the spectrogram and the encoder-output methods.

    ``S[t, c] = mean_{k: m_k[c]} s_k[t] - mean_k s_k[t]``: the mean score of the masks that hid cell ``c``, minus
    the mean score of all masks. The subtracted term is one constant per row, so every ranking, correlation and
    deletion curve is that of the plain mean over the hiding masks (SPES, RISE); without it every cell carries
    that constant as a floor (a cell the output does not depend on gets the mean score of all masks, not 0),
    which hides where the output depends on the input when the map is read as mass.

    Args:
        scores: float ``[K, T]``: each mask's score per row.
        masks: bool ``[K, *cells]``: True = hidden.

    Returns:
        float64 ``[T, *cells]``; 0 for cells no mask hid.
    """
    k = masks.shape[0]
    hidden = masks.reshape(k, -1).astype(np.float64)  # [K, C]
    counts = hidden.sum(0)
    total = scores.T.astype(np.float64) @ hidden  # [T, C]
    mean_hidden = np.divide(total, counts, out=np.zeros_like(total), where=counts > 0)
    out = np.where(counts > 0, mean_hidden - scores.mean(0)[:, None], 0.0)
    return out.reshape(scores.shape[1], *masks.shape[1:])


def compute_speech(name: str, decoding: ForcedDecoding, **params: Any) -> np.ndarray:
    """Run the audio attribution method ``name`` on one clip.

    Args:
        name: a registered method of input kind "audio" ("perturbation", "gradient", "encoder_perturbation").
        decoding: the clip under forced decoding.
        **params: overrides of the method's default parameters.

    Returns:
        float32 numpy ``[T, F, M]`` ("spectrogram" resolution: token row, feature frame, mel bin) or
        ``[T, E]`` ("encoder_frame").
    """
    from attnviz.errors import InputError

    method = get(name)
    if method.input_kind != "audio":
        raise InputError(f"attribution {name!r} explains {method.input_kind} inputs, not audio")
    unknown = set(params) - set(method.params)
    if unknown:
        raise InputError(f"attribution {name!r} has no parameter(s) {', '.join(sorted(unknown))}; "
                         f"it takes {', '.join(method.params) or 'none'}")
    kwargs = {**method.params, **params}
    import torch

    grad = torch.enable_grad() if method.needs_grad else torch.no_grad()
    with grad:
        result = method.fn(decoding=decoding, **kwargs)
    result = np.ascontiguousarray(result.detach().float().cpu().numpy() if hasattr(result, "detach") else result,
                                  dtype=np.float32)
    expected = ((decoding.n_rows, decoding.n_frames, int(decoding.features.shape[1]))
                if method.resolution == "spectrogram" else (decoding.n_rows, decoding.n_encoder_frames))
    if result.shape != expected:
        raise RuntimeError(f"attribution {name!r} returned shape {result.shape}, expected {expected}")
    return result
