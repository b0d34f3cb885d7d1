"""Speech attributions and deletion curves on hand-built models whose output depends on one known time window
only, and the batching of the perturbation masks (batched = one forward per mask)."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from extractor.attributions.speech import (
    DEFAULT_SCALES,
    ForcedDecoding,
    compute_speech,
    hidden_mean_scores,
    kl_rows,
    random_masks,
)
from extractor.deletion import deletion_curves, deletion_fractions

N_MEL, WINDOW_FRAMES, AUDIO = 8, 240, 200
WINDOW = (80, 130)  # feature frames the output depends on: 25% of the audio
ENCODER_WINDOW = (40, 65)  # the same frames at the encoder's resolution (two feature frames each)


class WindowModel(torch.nn.Module):
    """Whisper's interface, but the logits of every row are a linear function of the encoder output averaged over
    ``ENCODER_WINDOW`` alone, and its "encoder" averages pairs of feature frames (Whisper's stride 2, no mixing
    over time): nothing outside feature frames ``WINDOW`` can matter."""

    def __init__(self, vocab: int = 6, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.W = torch.nn.Parameter(torch.randn(vocab, N_MEL, generator=g) * 3)
        self.row_bias = torch.randn(4, vocab, generator=g)

    def _encode(self, features: torch.Tensor) -> torch.Tensor:  # [N, mel, F] -> [N, F / 2, mel]
        return features.reshape(*features.shape[:2], -1, 2).mean(-1).transpose(1, 2)

    def get_encoder(self):
        return lambda features: SimpleNamespace(last_hidden_state=self._encode(features))

    def forward(self, input_features=None, decoder_input_ids=None, encoder_outputs=None, use_cache=False, **_):
        hidden = encoder_outputs.last_hidden_state if encoder_outputs is not None else self._encode(input_features)
        a, b = ENCODER_WINDOW
        x = hidden[:, a:b].mean(1)  # [N, mel]
        n_rows = decoder_input_ids.shape[1]
        return SimpleNamespace(logits=(x @ self.W.T)[:, None, :] + self.row_bias[None, :n_rows])


@pytest.fixture(scope="module")
def decoding() -> ForcedDecoding:
    torch.manual_seed(1)
    features = torch.randn(1, N_MEL, WINDOW_FRAMES)
    return ForcedDecoding(WindowModel(), features, torch.zeros(1, 3, dtype=torch.long), torch.tensor([1, 2, 3]),
                          AUDIO, AUDIO // 2)


def _share_in_window(profile: np.ndarray, window: tuple[int, int] = WINDOW) -> float:
    positive = np.clip(profile, 0, None)
    return float(positive[window[0]:window[1]].sum() / positive.sum())


def test_perturbation_saliency_puts_most_of_its_mass_in_the_window(decoding):
    s = compute_speech("perturbation", decoding, n_masks=1024, batch_size=128)
    assert s.shape == (3, AUDIO, N_MEL)
    profile = s.sum(-1).mean(0)  # over mel bins, mean over rows
    assert _share_in_window(profile) > 0.55  # most of it; the window is 25% of the audio
    assert WINDOW[0] <= int(profile.argmax()) < WINDOW[1]
    # far from the window (beyond the largest cell, 40 frames) the map holds noise around 0, below the window's level
    far = np.r_[profile[:WINDOW[0] - 40], profile[WINDOW[1] + 40:]]
    assert abs(far.mean()) < 0.5 * profile[WINDOW[0]:WINDOW[1]].mean()


def test_the_uncentred_mean_would_not_concentrate(decoding):
    """Why the estimator subtracts each row's mean score: without it, cells the output ignores keep the mean KL."""
    masks = random_masks(np.random.default_rng(0), 1024, N_MEL, AUDIO, DEFAULT_SCALES, 0.25)
    keep = torch.ones(1024, N_MEL, WINDOW_FRAMES)
    keep[:, :, :AUDIO] = torch.as_tensor(~masks, dtype=torch.float32)
    with torch.no_grad():
        scores = kl_rows(decoding.logprobs(decoding.features)[0], decoding.logprobs(decoding.features * keep)).numpy()
    hidden = masks.reshape(1024, -1).astype(float)
    plain = (scores.T @ hidden) / hidden.sum(0)  # the mean over the masks that hid each cell
    centred = hidden_mean_scores(scores, masks).reshape(3, -1)
    np.testing.assert_allclose(centred, plain - scores.mean(0)[:, None], atol=1e-9)  # a constant per row
    assert _share_in_window(plain.reshape(3, N_MEL, AUDIO).sum(1).mean(0)) < 0.35
    assert _share_in_window(centred.reshape(3, N_MEL, AUDIO).sum(1).mean(0)) > 0.55


def test_batched_masks_equal_one_forward_per_mask(decoding):
    batched = compute_speech("perturbation", decoding, n_masks=24, batch_size=24, seed=3)
    one_by_one = compute_speech("perturbation", decoding, n_masks=24, batch_size=1, seed=3)
    np.testing.assert_allclose(batched, one_by_one, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("method", ["saliency", "input_x_gradient", "integrated_gradients"])
def test_gradient_saliency_is_zero_outside_the_window(decoding, method):
    s = compute_speech("gradient", decoding, method=method, n_steps=8, batch_size=2)
    profile = s.sum(-1)  # [rows, frames]
    assert (profile[:, WINDOW[0]:WINDOW[1]] > 0).all()
    assert np.abs(np.delete(profile, np.arange(*WINDOW), axis=1)).max() == 0
    if method == "saliency":  # |d log p / d x| of a mean: the same for every frame of the window, by hand
        x = decoding.features.detach().clone().requires_grad_(True)
        lp = decoding.token_logprobs(x)[0, 1]
        (grad,) = torch.autograd.grad(lp, x)
        np.testing.assert_allclose(s[1], grad[0, :, :AUDIO].abs().T.numpy(), rtol=1e-4, atol=1e-7)


def test_encoder_perturbation_finds_the_window(decoding):
    s = compute_speech("encoder_perturbation", decoding, n_masks=512, batch_size=64)
    assert s.shape == (3, AUDIO // 2)
    assert _share_in_window(s.mean(0), ENCODER_WINDOW) > 0.6


def test_masks_have_the_scales_and_the_rate_asked_for():
    rng = np.random.default_rng(0)
    masks = random_masks(rng, 400, 80, 300, ((0.25, 10), (1.0, 40)), 0.3)
    assert masks.shape == (400, 80, 300) and masks.dtype == bool
    assert abs(masks.mean() - 0.3) < 0.03
    full_band = masks[1::2]  # the second scale's cells span every mel bin
    assert (full_band == full_band[:, :1, :]).all()
    runs = np.diff(masks[0, 0].astype(int)).nonzero()[0]
    assert (np.diff(runs) % 10 == 0).all()  # cell edges 10 frames apart


def test_deletion_curves_fall_faster_for_the_true_relevance(decoding):
    t, e = decoding.n_rows, decoding.n_encoder_frames
    truth = np.zeros((t, e))
    truth[:, ENCODER_WINDOW[0]:ENCODER_WINDOW[1]] = 1.0
    curves = deletion_curves(decoding, {"truth": truth, "reverse": 1.0 - truth}, steps=8, batch_size=16)
    assert curves.shape == (2, 9, t)
    with torch.no_grad():
        base = decoding.token_logprobs(decoding.features)[0].numpy()
        zero = decoding.features.clone()
        zero[:, :, :AUDIO] = 0
        gone = decoding.token_logprobs(zero)[0].numpy()
    np.testing.assert_allclose(curves[:, 0], np.tile(base, (2, 1)), atol=1e-5)
    np.testing.assert_allclose(curves[:, -1], np.tile(gone, (2, 1)), atol=1e-5)  # every frame removed
    # removing the window first changes the tokens at once; removing everything else first changes nothing
    # until the window is reached (fraction 75% of the frames lie outside it)
    f = deletion_fractions(8)
    outside_only = f <= 1 - (WINDOW[1] - WINDOW[0]) / AUDIO
    np.testing.assert_allclose(curves[1, outside_only], np.tile(base, (outside_only.sum(), 1)), atol=1e-5)
    assert np.abs(curves[0, 2] - base).max() > 0.01
