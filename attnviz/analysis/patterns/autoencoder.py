"""The convolutional autoencoder of the pattern atlas (torch; imported only when training).

Nothing in ``attnviz`` imports this module at import time: :func:`attnviz.analysis.patterns.atlas.compute_patterns`
imports it inside the function that trains, so opening a file or serving the dashboard never loads torch.

Architecture (``C1``/``C2`` channels, ``d`` latent size, input ``H x W`` padded up to multiples of 4)::

    input  [1, H, W]  the map; invalid positions filled with its mean over the valid ones
    Conv 4x4/2 -> GELU -> Conv 4x4/2 -> GELU        [C2, H/4, W/4]
    flatten, concat prefix mass (1 value)            [C2*H/4*W/4 + 1]
    Linear                                           [d]                 the latent code
    Linear -> split (features, prefix)               [C2*H/4*W/4 + 1]
    GELU -> ConvT 4x4/2 -> GELU -> ConvT 4x4/2       [1, H, W]
    sigmoid on both the map and the prefix mass; crop to the input size

The loss is the masked mean squared error: per map, the squared error summed over the valid
positions plus the squared error of the prefix mass, divided by (valid positions + 1); averaged over
the maps of a batch. Invalid positions (offsets that fall outside the image for that query) never
contribute, so "attends to its left neighbour" has one code wherever the query sits.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from attnviz.analysis.threads import default_threads

__all__ = ["AutoencoderConfig", "ConvAutoencoder", "TrainedAutoencoder", "train_autoencoder", "load_autoencoder"]


@dataclass(frozen=True)
class AutoencoderConfig:
    """Shape of the network. ``height``/``width``: the map size (e.g. 27 x 27 for a 14 x 14 grid, centred)."""

    height: int
    width: int
    latent: int = 16
    channels: tuple[int, int] = (16, 32)

    @property
    def padded(self) -> tuple[int, int]:
        return 4 * math.ceil(self.height / 4), 4 * math.ceil(self.width / 4)

    def as_dict(self) -> dict[str, Any]:
        return {"height": self.height, "width": self.width, "latent": self.latent, "channels": list(self.channels)}


class ConvAutoencoder(nn.Module):
    """Encoder ``(map, mask, prefix) -> latent``, decoder ``latent -> (map, prefix)``; see the module docstring."""

    def __init__(self, config: AutoencoderConfig) -> None:
        super().__init__()
        self.config = config
        c1, c2 = config.channels
        ph, pw = config.padded
        self._bottom = (c2, ph // 4, pw // 4)
        flat = c2 * (ph // 4) * (pw // 4)
        self.encoder = nn.Sequential(
            nn.Conv2d(1, c1, 4, stride=2, padding=1), nn.GELU(),
            nn.Conv2d(c1, c2, 4, stride=2, padding=1), nn.GELU(),
        )
        self.to_latent = nn.Linear(flat + 1, config.latent)
        self.from_latent = nn.Linear(config.latent, flat + 1)
        self.decoder = nn.Sequential(
            nn.GELU(),
            nn.ConvTranspose2d(c2, c1, 4, stride=2, padding=1), nn.GELU(),
            nn.ConvTranspose2d(c1, 1, 4, stride=2, padding=1),
        )

    def _pad(self, x: torch.Tensor) -> torch.Tensor:
        ph, pw = self.config.padded
        return F.pad(x, (0, pw - x.shape[-1], 0, ph - x.shape[-2]))

    def encode(self, values: torch.Tensor, mask: torch.Tensor, prefix: torch.Tensor) -> torch.Tensor:
        """values, mask: ``[batch, H, W]``; prefix: ``[batch]`` -> latent ``[batch, d]``."""
        # positions outside the image take the map's mean over the valid ones: a uniform map then
        # looks uniform wherever its query sits, and the encoder is not told the query position
        fill = (values * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp_min(1.0)
        x = self._pad((values * mask + (1 - mask) * fill[:, None, None])[:, None])
        h = self.encoder(x).flatten(1)
        return self.to_latent(torch.cat([h, prefix[:, None]], dim=1))

    def decode(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """latent ``[batch, d]`` -> (map ``[batch, H, W]`` in [0, 1], prefix ``[batch]`` in [0, 1])."""
        h = self.from_latent(z)
        feat, pre = h[:, :-1], h[:, -1]
        y = self.decoder(feat.reshape(-1, *self._bottom))[:, 0, : self.config.height, : self.config.width]
        return torch.sigmoid(y), torch.sigmoid(pre)

    def forward(self, values: torch.Tensor, mask: torch.Tensor, prefix: torch.Tensor):  # noqa: D102
        return self.decode(self.encode(values, mask, prefix))


def masked_error(recon: torch.Tensor, recon_prefix: torch.Tensor, values: torch.Tensor, mask: torch.Tensor,
                 prefix: torch.Tensor) -> torch.Tensor:
    """Per-map masked mean squared error ``[batch]`` (see the module docstring)."""
    se = ((recon - values) ** 2 * mask).flatten(1).sum(1) + (recon_prefix - prefix) ** 2
    return se / (mask.flatten(1).sum(1) + 1.0)


@dataclass
class TrainedAutoencoder:
    """A trained network plus its history. ``weights`` are plain float32 arrays (stored without pickle)."""

    model: ConvAutoencoder
    device: str
    train_loss: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    best_epoch: int = 0
    seconds: float = 0.0
    stopped_early: bool = False

    @property
    def config(self) -> AutoencoderConfig:
        return self.model.config

    def weights(self) -> dict[str, np.ndarray]:
        """``state_dict`` as numpy arrays (name -> float32 array)."""
        return {k: v.detach().cpu().numpy().astype(np.float32) for k, v in self.model.state_dict().items()}

    @torch.no_grad()
    def encode(self, values: np.ndarray, prefix: np.ndarray, mask_table: np.ndarray, mask_index: np.ndarray,
               batch_size: int = 2048) -> np.ndarray:
        """Latent codes float32 ``[n, d]`` of maps (arguments as in :func:`train_autoencoder`)."""
        self.model.eval()
        table = _tensor(mask_table, self.device)
        out = []
        for i in range(0, len(values), batch_size):
            v, p = (_tensor(a[i : i + batch_size], self.device) for a in (values, prefix))
            m = table[torch.from_numpy(np.asarray(mask_index[i : i + batch_size], np.int64)).to(self.device)]
            out.append(self.model.encode(v, m, p).cpu().numpy())
        return np.concatenate(out) if out else np.zeros((0, self.config.latent), np.float32)

    @torch.no_grad()
    def decode(self, latent: np.ndarray, batch_size: int = 2048) -> tuple[np.ndarray, np.ndarray]:
        """latent ``[n, d]`` -> (maps float32 ``[n, H, W]``, prefix float32 ``[n]``)."""
        self.model.eval()
        maps, pre = [], []
        for i in range(0, len(latent), batch_size):
            y, p = self.model.decode(_tensor(latent[i : i + batch_size], self.device))
            maps.append(y.cpu().numpy())
            pre.append(p.cpu().numpy())
        if not maps:
            return np.zeros((0, self.config.height, self.config.width), np.float32), np.zeros(0, np.float32)
        return np.concatenate(maps), np.concatenate(pre)



def resolve_device(device: str) -> str:
    """"auto" -> "cuda" when available else "cpu"; "cuda" without a GPU is an error the caller reports."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was asked for but torch sees no CUDA GPU; use --device cpu")
    return device


def train_autoencoder(
    values: np.ndarray,
    prefix: np.ndarray,
    mask_table: np.ndarray,
    mask_index: np.ndarray,
    *,
    config: AutoencoderConfig,
    epochs: int = 30,
    patience: int = 3,
    batch_size: int = 256,
    lr: float = 2e-3,
    val_fraction: float = 0.1,
    min_steps: int = 50,
    seed: int = 0,
    device: str = "auto",
    threads: int | None = None,
    progress: Callable[[int, int, float, float], None] | None = None,
    show_bar: bool = False,
) -> TrainedAutoencoder:
    """Train the autoencoder with Adam and early stopping on a held-out split.

    Args:
        values: float32 ``[n, H, W]`` maps (already normalised, 0 at invalid positions).
        prefix: float32 ``[n]``: the (normalised) attention mass on prefix tokens (CLS, registers).
        mask_table: float32/bool ``[n_queries, H, W]``: 1 where a position exists for a query
            (the validity mask depends only on the query's position, so it is stored once per query).
        mask_index: int ``[n]``: row of ``mask_table`` for each map (its query patch).
        config: network shape (``height``/``width`` must equal ``H``/``W``).
        epochs: maximum epochs; training stops earlier when the validation loss has not improved by
            0.5% for ``patience`` epochs, and the best epoch's weights are kept.
        batch_size, lr: Adam's minibatch size and learning rate.
        val_fraction: share of maps held out for early stopping (none when fewer than 20 maps).
        min_steps: minibatches per epoch at least (small samples are passed over several times).
        seed: seeds the split, the initialisation and the minibatch order.
        device: "auto", "cpu", "cuda", "cuda:1", ...
        threads: CPU threads for torch (default: :func:`default_threads`); restored after.
        progress: called after each epoch with (epoch, epochs, train_loss, val_loss).
        show_bar: show a tqdm bar on stderr.

    Returns:
        a :class:`TrainedAutoencoder` (model in eval mode on ``device``, loss history).
    """
    n = len(values)
    if values.shape[1:] != (config.height, config.width):
        raise ValueError(f"maps are {values.shape[1:]}, the network expects {(config.height, config.width)}")
    device = resolve_device(device)
    old_threads = torch.get_num_threads()
    torch.set_num_threads(threads or default_threads())
    try:
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        model = ConvAutoencoder(config)
        _init_output_bias(model, values, prefix, mask_table, mask_index)
        model = model.to(device)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        perm = torch.randperm(n, generator=gen).numpy()
        n_val = int(round(n * val_fraction)) if n >= 20 else 0
        val_idx, train_idx = np.sort(perm[:n_val]), np.sort(perm[n_val:])
        V, P, T = (_tensor(a, device) for a in (values, prefix, mask_table))
        Q = torch.from_numpy(np.asarray(mask_index, np.int64)).to(device)
        result = TrainedAutoencoder(model=model, device=device)
        best, best_state, bad = math.inf, None, 0
        bar = None
        if show_bar:
            from tqdm.auto import tqdm

            bar = tqdm(total=epochs, desc="autoencoder", unit="epoch", leave=False)
        t0 = time.perf_counter()
        train_t = torch.from_numpy(train_idx).to(device)
        # an epoch is one pass over the data, but at least `min_steps` minibatches, so that a small
        # sample still gets enough optimisation steps per epoch for early stopping to be meaningful
        passes = max(1, math.ceil(min_steps * batch_size / max(len(train_idx), 1)))
        for epoch in range(epochs):
            model.train()
            order = torch.cat([train_t[torch.randperm(len(train_t), generator=gen).to(device)] for _ in range(passes)])
            total, count = 0.0, 0
            for i in range(0, len(order), batch_size):
                b = order[i : i + batch_size]
                v, m, p = V[b], T[Q[b]], P[b]
                y, yp = model(v, m, p)
                loss = masked_error(y, yp, v, m, p).mean()
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                total += float(loss.detach()) * len(b)
                count += len(b)
            train_loss = total / max(count, 1)
            val_loss = _evaluate(model, V, P, T, Q, val_idx, device) if n_val else train_loss
            result.train_loss.append(train_loss)
            result.val_loss.append(val_loss)
            if val_loss < best * (1 - 5e-3):
                best, bad, result.best_epoch = val_loss, 0, epoch
                best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            else:
                bad += 1
            if bar is not None:
                bar.set_postfix(train=f"{train_loss:.4g}", val=f"{val_loss:.4g}")
                bar.update(1)
            if progress is not None:
                progress(epoch + 1, epochs, train_loss, val_loss)
            if bad >= patience:
                result.stopped_early = True
                break
        if bar is not None:
            bar.close()
        if best_state is not None:
            model.load_state_dict(best_state)
        model.eval()
        result.seconds = time.perf_counter() - t0
        return result
    finally:
        torch.set_num_threads(old_threads)


@torch.no_grad()
def _init_output_bias(model: ConvAutoencoder, values: np.ndarray, prefix: np.ndarray, mask_table: np.ndarray,
                      mask_index: np.ndarray) -> None:
    """Start the decoder's outputs at the data's mean (through the sigmoid), not at 0.5.

    Attention maps are sparse (most values near 0); from 0.5, the first large steps drive the
    sigmoid into saturation where the squared error has no gradient left, and the network outputs
    zeros for ever (seen here on 27x27 maps at lr 2e-3).
    """
    m = np.asarray(mask_table, np.float64)[np.asarray(mask_index)[:4096]]
    v = np.asarray(values[:4096], np.float64)
    mean_map = float((v * m).sum() / max(m.sum(), 1.0))
    mean_prefix = float(np.mean(prefix[:4096])) if len(prefix) else 0.5

    def logit(p: float) -> float:
        p = min(max(p, 1e-3), 1 - 1e-3)
        return math.log(p / (1 - p))

    model.decoder[-1].bias.fill_(logit(mean_map))
    model.from_latent.bias[-1] = logit(mean_prefix)


@torch.no_grad()
def _evaluate(model: ConvAutoencoder, V: torch.Tensor, P: torch.Tensor, T: torch.Tensor, Q: torch.Tensor,
              idx: np.ndarray, device: str, batch_size: int = 4096) -> float:
    model.eval()
    total = 0.0
    for i in range(0, len(idx), batch_size):
        b = torch.from_numpy(idx[i : i + batch_size]).to(device)
        v, m, p = V[b], T[Q[b]], P[b]
        y, yp = model(v, m, p)
        total += float(masked_error(y, yp, v, m, p).sum())
    return total / max(len(idx), 1)


def load_autoencoder(weights: Mapping[str, np.ndarray], config: AutoencoderConfig,
                     device: str = "cpu") -> TrainedAutoencoder:
    """Rebuild a trained network from the arrays :meth:`TrainedAutoencoder.weights` returned."""
    model = ConvAutoencoder(config)
    model.load_state_dict({k: torch.from_numpy(np.asarray(v)) for k, v in weights.items()})
    model.to(device).eval()
    return TrainedAutoencoder(model=model, device=device)


def _tensor(a: np.ndarray, device: str) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)).to(device)
