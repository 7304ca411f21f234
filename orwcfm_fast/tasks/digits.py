"""The 8x8 digits task: a small torchcfm UNet, its pretraining, and a reward classifier.

Everything here is CPU-friendly: with the defaults, pretraining the UNet takes about
two minutes and training the classifier ~13 s on two CPU cores. Both are
cached on disk (see :func:`load_or_pretrain_digits_unet` and
:func:`load_or_train_digits_classifier`) so that later runs start immediately.

Two classifier architectures: the reward's CNN (:class:`DigitsClassifier`, ``architecture="cnn"``) and a
convolution-free MLP (:class:`DigitsMLPClassifier`, ``"mlp"``), the held-out judge of ``orwcfm-fast sweep``
(:data:`HELD_OUT_CLASSIFIER`): another architecture, another seed and another train/test split, so samples
that fool the reward's CNN need not fool it.

Nothing is computed or loaded at import time.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import tempfile
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "CACHE_VERSION",
    "CLASSIFIER_DEFAULTS",
    "DIGITS_UNET_KWARGS",
    "PRETRAIN_DEFAULTS",
    "CLASSIFIER_ARCHITECTURES",
    "DigitsClassifier",
    "DigitsMLPClassifier",
    "HELD_OUT_CLASSIFIER",
    "classifier_cache_path",
    "load_or_pretrain_digits_unet",
    "load_or_train_digits_classifier",
    "make_digits_unet",
    "pretrain_cfm",
    "train_classifier",
    "unet_cache_path",
]

#: Bumped whenever the training code changes in a way that invalidates cached weights.
CACHE_VERSION = "digits-v1"

#: Keyword arguments of torchcfm's ``UNetModelWrapper`` for the 8x8 digits.
#: Two resolutions (8x8 with 32 channels, 4x4 with 64), one residual block each and
#: self-attention at 4x4: ~0.7M parameters, ~30 ms per forward pass of 64 images on
#: two CPU cores. ``dropout=0.1`` mirrors the paper's CIFAR-10 UNet.
DIGITS_UNET_KWARGS: dict[str, Any] = {
    "dim": (1, 8, 8),
    "num_channels": 32,
    "num_res_blocks": 1,
    "channel_mult": (1, 2),
    "attention_resolutions": "4",
    "num_heads": 1,
    "num_head_channels": -1,
    "dropout": 0.1,
}

#: Default pretraining hyperparameters (~126 s on two idle CPU cores; the samples are
#: recognisable digits, 84% classified with probability > 0.9).
PRETRAIN_DEFAULTS: dict[str, Any] = {"steps": 800, "batch_size": 128, "lr": 2e-3, "seed": 0}

#: Default classifier hyperparameters (~13 s on two CPU cores; held-out accuracy 0.994).
CLASSIFIER_DEFAULTS: dict[str, Any] = {"steps": 600, "batch_size": 128, "lr": 2e-3, "seed": 0}

#: The held-out classifier of ``orwcfm-fast sweep`` (keywords of :func:`load_or_train_digits_classifier`):
#: the MLP, seed 1 (its own initialisation, minibatches and 80/20 split), 1500 steps (~21 s on one CPU
#: thread; held-out accuracy 0.981, 0.947 after the CNN's 600), otherwise the reward's recipe.
HELD_OUT_CLASSIFIER: dict[str, Any] = {**CLASSIFIER_DEFAULTS, "steps": 1500, "seed": 1, "architecture": "mlp"}


def _resolve_device(device: torch.device | str | None) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def _rng_devices(device: torch.device) -> list:
    return [device] if device.type == "cuda" else []


def make_digits_unet(**overrides: Any) -> nn.Module:
    """Build the small torchcfm UNet used for the 8x8 digits.

    Args:
        **overrides: Replace entries of :data:`DIGITS_UNET_KWARGS` (e.g. ``num_res_blocks=2``).

    Returns:
        A ``torchcfm.models.unet.UNetModelWrapper`` called as ``model(t, x)`` with
        ``t`` ``[B]`` in ``[0, 1]`` and ``x`` ``[B, 1, 8, 8]``, returning a velocity ``[B, 1, 8, 8]``.
    """
    from orwcfm_fast.rng import keep_global_states

    with keep_global_states():  # torchcfm imports POT, which draws from Python's `random` on import
        from torchcfm.models.unet.unet import UNetModelWrapper

    kwargs = {**DIGITS_UNET_KWARGS, **overrides}
    kwargs["dim"] = tuple(kwargs["dim"])
    kwargs["channel_mult"] = tuple(kwargs["channel_mult"])
    return UNetModelWrapper(**kwargs)


class DigitsClassifier(nn.Module):
    """A small CNN classifying 8x8 digit images.

    Three 3x3 convolutions (32, 64, 64 channels, GroupNorm + SiLU), two 2x2 max-pools
    and a two-layer head; ~75k parameters.

    Args:
        num_classes: Number of output logits.
        dropout: Dropout before the last layer (active only in training mode).
    """

    def __init__(self, num_classes: int = 10, dropout: float = 0.2):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1),
            nn.GroupNorm(8, 32),
            nn.SiLU(),
            nn.Conv2d(32, 64, 3, padding=1),
            nn.GroupNorm(8, 64),
            nn.SiLU(),
            nn.MaxPool2d(2),  # 8x8 -> 4x4
            nn.Conv2d(64, 64, 3, padding=1),
            nn.GroupNorm(8, 64),
            nn.SiLU(),
            nn.MaxPool2d(2),  # 4x4 -> 2x2
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64 * 2 * 2, 128),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Classify images.

        Args:
            x: ``[B, 1, 8, 8]`` images in ``[-1, 1]``.

        Returns:
            ``[B, num_classes]`` logits.
        """
        return self.head(self.features(x))


class DigitsMLPClassifier(nn.Module):
    """A convolution-free classifier of 8x8 digit images: an MLP on the 64 pixels.

    ``64 -> 256 -> 128 -> num_classes`` with SiLU, dropout before the last layer; ~50k parameters. No
    convolution, pooling or normalisation layer: it shares no inductive bias with :class:`DigitsClassifier`
    beyond being trained on the same digits.

    Args:
        num_classes: Number of output logits.
        dropout: Dropout before the last layer (active only in training mode).
    """

    def __init__(self, num_classes: int = 10, dropout: float = 0.2):
        super().__init__()
        self.net = nn.Sequential(
            nn.Flatten(),
            nn.Linear(64, 256),
            nn.SiLU(),
            nn.Linear(256, 128),
            nn.SiLU(),
            nn.Dropout(dropout),
            nn.Linear(128, num_classes),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x`` ``[B, 1, 8, 8]`` images in ``[-1, 1]`` -> ``[B, num_classes]`` logits."""
        return self.net(x)


#: ``architecture`` of the classifier functions -> its class
CLASSIFIER_ARCHITECTURES: dict[str, type[nn.Module]] = {"cnn": DigitsClassifier, "mlp": DigitsMLPClassifier}


def _classifier_class(architecture: str) -> type[nn.Module]:
    if architecture not in CLASSIFIER_ARCHITECTURES:
        raise ValueError(f"unknown classifier architecture {architecture!r}; one of {sorted(CLASSIFIER_ARCHITECTURES)}")
    return CLASSIFIER_ARCHITECTURES[architecture]


def pretrain_cfm(
    model: nn.Module,
    images: torch.Tensor,
    *,
    steps: int,
    batch_size: int = 128,
    lr: float = 2e-3,
    device: torch.device | str | None = None,
    seed: int = 0,
    progress: bool = True,
    grad_clip: float = 1.0,
    loss_history: list[float] | None = None,
) -> nn.Module:
    """Pretrain ``model`` with plain conditional flow matching (independent coupling).

    Each step draws a minibatch ``x_1`` of ``images``, noise ``x_0 ~ N(0, I)`` and
    ``t ~ U(0, 1)``, forms ``x_t = t x_1 + (1 - t) x_0`` and regresses
    ``model(t, x_t)`` onto ``u_t = x_1 - x_0`` with a mean squared error, using Adam
    (100 linear warm-up steps, then cosine decay to 10% of ``lr``) and gradient-norm
    clipping. No EMA is kept.

    Randomness (minibatches, noise, times, dropout) comes from ``seed`` only; the
    caller's global RNG state is left untouched.

    Args:
        model: A velocity field called as ``model(t, x)``; trained in place.
        images: ``[N, C, H, W]`` training data in ``[-1, 1]``.
        steps: Number of optimisation steps.
        batch_size: Minibatch size.
        lr: Peak Adam learning rate.
        device: Where to train; ``None`` picks CUDA when available, else CPU.
        seed: Seed of all the randomness used.
        progress: Show a tqdm progress bar with the running loss.
        grad_clip: Maximum global gradient norm (``<= 0`` disables clipping).
        loss_history: If given, the loss of every step is appended to it.

    Returns:
        ``model`` (on ``device``, left in eval mode).
    """
    from tqdm.auto import tqdm

    device = _resolve_device(device)
    model = model.to(device)
    data = images.to(device=device, dtype=torch.float32)
    n = data.shape[0]
    gen = torch.Generator().manual_seed(seed)  # CPU generator: same draws on every device
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    warmup = min(100, max(1, steps // 10))

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        frac = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * frac)))

    model.train()
    with torch.random.fork_rng(devices=_rng_devices(device)):
        torch.manual_seed(seed)  # dropout
        bar = tqdm(range(steps), desc="pretrain CFM", disable=not progress, dynamic_ncols=True)
        ema_loss = None
        for step in bar:
            idx = torch.randint(0, n, (batch_size,), generator=gen)
            x1 = data[idx.to(device)]
            x0 = torch.randn(x1.shape, generator=gen).to(device)
            t = torch.rand(batch_size, generator=gen).to(device)
            tb = t.view(-1, *([1] * (x1.dim() - 1)))
            xt = tb * x1 + (1.0 - tb) * x0
            ut = x1 - x0
            loss = F.mse_loss(model(t, xt), ut)
            for group in opt.param_groups:
                group["lr"] = lr_at(step)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if grad_clip > 0:
                torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
            opt.step()
            value = float(loss.detach())
            if loss_history is not None:
                loss_history.append(value)
            ema_loss = value if ema_loss is None else 0.98 * ema_loss + 0.02 * value
            if progress and (step % 10 == 0 or step == steps - 1):
                bar.set_postfix(loss=f"{ema_loss:.4f}")
        bar.close()
    model.eval()
    return model


def _random_shift(x: torch.Tensor, max_shift: int, gen: torch.Generator) -> torch.Tensor:
    """Shift each image by up to ``max_shift`` pixels in x and y, filling with background (-1)."""
    b, _, h, w = x.shape
    padded = F.pad(x, (max_shift,) * 4, value=-1.0)
    dy = torch.randint(0, 2 * max_shift + 1, (b,), generator=gen).tolist()
    dx = torch.randint(0, 2 * max_shift + 1, (b,), generator=gen).tolist()
    return torch.stack([padded[i, :, dy[i] : dy[i] + h, dx[i] : dx[i] + w] for i in range(b)])


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    model.eval()
    correct = 0
    for start in range(0, x.shape[0], 512):
        logits = model(x[start : start + 512])
        correct += int((logits.argmax(1) == y[start : start + 512]).sum())
    return correct / max(1, x.shape[0])


def train_classifier(
    images: torch.Tensor,
    labels: torch.Tensor,
    *,
    steps: int = 600,
    device: torch.device | str | None = None,
    seed: int = 0,
    batch_size: int = 128,
    lr: float = 2e-3,
    test_fraction: float = 0.2,
    progress: bool = False,
    architecture: str = "cnn",
) -> tuple[nn.Module, float]:
    """Train a digits classifier (:class:`DigitsClassifier`, or :class:`DigitsMLPClassifier` with
    ``architecture="mlp"``) and measure its held-out accuracy.

    The data are split at random (fixed by ``seed``) into ``1 - test_fraction`` for
    training and ``test_fraction`` held out. Training images are augmented with random
    shifts of up to one pixel and Gaussian pixel noise (std 0.1), so the classifier
    also gives sensible scores to slightly off-centre or noisy generated digits.

    Args:
        images: ``[N, 1, 8, 8]`` images in ``[-1, 1]``.
        labels: ``[N]`` int64 classes.
        steps: Number of Adam steps.
        device: Where to train; ``None`` picks CUDA when available, else CPU.
        seed: Seed of the split, the minibatches, the augmentation and the initialisation.
        batch_size: Minibatch size.
        lr: Adam learning rate (cosine-decayed to 0).
        test_fraction: Fraction of the data held out for the accuracy.
        progress: Show a tqdm progress bar.
        architecture: ``"cnn"`` or ``"mlp"`` (:data:`CLASSIFIER_ARCHITECTURES`).

    Returns:
        ``(classifier, accuracy)``: the classifier on ``device`` in eval mode, and its
        accuracy in ``[0, 1]`` on the held-out images.
    """
    from tqdm.auto import tqdm

    model_class = _classifier_class(architecture)
    device = _resolve_device(device)
    gen = torch.Generator().manual_seed(seed)
    perm = torch.randperm(images.shape[0], generator=gen)
    n_test = int(round(test_fraction * images.shape[0]))
    test_idx, train_idx = perm[:n_test], perm[n_test:]
    x_train, y_train = images[train_idx].float(), labels[train_idx]
    x_test, y_test = images[test_idx].float().to(device), labels[test_idx].to(device)

    with torch.random.fork_rng(devices=_rng_devices(device)):
        torch.manual_seed(seed)  # initialisation and dropout
        model = model_class().to(device)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(1, steps))
        model.train()
        for _ in tqdm(range(steps), desc="train classifier", disable=not progress, dynamic_ncols=True):
            idx = torch.randint(0, x_train.shape[0], (batch_size,), generator=gen)
            xb = _random_shift(x_train[idx], 1, gen)
            xb = xb + 0.1 * torch.randn(xb.shape, generator=gen)
            xb, yb = xb.to(device), y_train[idx].to(device)
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    accuracy = _accuracy(model, x_test, y_test)
    model.eval()
    return model, accuracy


# ----------------------------------------------------------------------------- caching


def _jsonable(value: Any) -> Any:
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    return value


def _cache_path(cache_dir: str | os.PathLike, name: str, hparams: dict[str, Any]) -> Path:
    blob = json.dumps({"version": CACHE_VERSION, **_jsonable(hparams)}, sort_keys=True)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:12]
    return Path(cache_dir) / f"{name}-{digest}.pt"


def _atomic_save(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, then ``os.replace`` it into place."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save(obj, f)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a cache is as readable as any saved file
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _unet_hparams(steps, batch_size, lr, seed, unet_kwargs) -> dict[str, Any]:
    return {
        "unet": _jsonable({**DIGITS_UNET_KWARGS, **(unet_kwargs or {})}),
        "steps": int(steps),
        "batch_size": int(batch_size),
        "lr": float(lr),
        "seed": int(seed),
    }


def unet_cache_path(
    cache_dir: str | os.PathLike = "runs/cache",
    *,
    steps: int = PRETRAIN_DEFAULTS["steps"],
    batch_size: int = PRETRAIN_DEFAULTS["batch_size"],
    lr: float = PRETRAIN_DEFAULTS["lr"],
    seed: int = PRETRAIN_DEFAULTS["seed"],
    unet_kwargs: dict[str, Any] | None = None,
) -> Path:
    """Where :func:`load_or_pretrain_digits_unet` caches a UNet with these hyperparameters.

    Returns:
        ``cache_dir / "digits-unet-<12 hex digits>.pt"``; the digits hash the
        hyperparameters and :data:`CACHE_VERSION`.
    """
    return _cache_path(cache_dir, "digits-unet", _unet_hparams(steps, batch_size, lr, seed, unet_kwargs))


def load_or_pretrain_digits_unet(
    cache_dir: str | os.PathLike = "runs/cache",
    device: torch.device | str | None = None,
    *,
    steps: int = PRETRAIN_DEFAULTS["steps"],
    batch_size: int = PRETRAIN_DEFAULTS["batch_size"],
    lr: float = PRETRAIN_DEFAULTS["lr"],
    seed: int = PRETRAIN_DEFAULTS["seed"],
    unet_kwargs: dict[str, Any] | None = None,
    progress: bool = True,
) -> nn.Module:
    """Return the pretrained digits UNet, training and caching it on first use.

    The cache file (see :func:`unet_cache_path`) uses torchcfm's checkpoint layout
    ``{"net_model": state_dict, "ema_model": state_dict, "step": int}`` (here the EMA
    entry equals ``net_model``, as no EMA is kept) plus ``"hparams"`` and
    ``"version"``, so it loads like any torchcfm CIFAR-10 checkpoint::

        ckpt = torch.load(path, map_location="cpu")
        model.load_state_dict(ckpt["ema_model"])

    Args:
        cache_dir: Folder of the cache (created if missing).
        device: Where to put (and train) the model; ``None`` picks CUDA when available.
        steps, batch_size, lr, seed: Pretraining hyperparameters (see :func:`pretrain_cfm`).
        unet_kwargs: Overrides of :data:`DIGITS_UNET_KWARGS`.
        progress: Show a progress bar while pretraining.

    Returns:
        The UNet on ``device`` in eval mode.
    """
    device = _resolve_device(device)
    hparams = _unet_hparams(steps, batch_size, lr, seed, unet_kwargs)
    path = unet_cache_path(cache_dir, steps=steps, batch_size=batch_size, lr=lr, seed=seed, unet_kwargs=unet_kwargs)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)  # initial weights
        model = make_digits_unet(**(unet_kwargs or {}))
    if path.exists():
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        model.load_state_dict(ckpt["net_model"])
        return model.to(device).eval()

    from orwcfm_fast.data.digits import load_digits_images

    images, _ = load_digits_images()
    model = pretrain_cfm(
        model, images, steps=steps, batch_size=batch_size, lr=lr, device=device, seed=seed, progress=progress
    )
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    _atomic_save(
        {"net_model": state, "ema_model": state, "step": int(steps), "hparams": hparams, "version": CACHE_VERSION},
        path,
    )
    return model.eval()


def _classifier_hparams(steps, batch_size, lr, seed) -> dict[str, Any]:
    return {"steps": int(steps), "batch_size": int(batch_size), "lr": float(lr), "seed": int(seed)}


def _classifier_file_prefix(architecture: str) -> str:
    _classifier_class(architecture)
    return "digits-classifier" if architecture == "cnn" else f"digits-{architecture}-classifier"


def classifier_cache_path(
    cache_dir: str | os.PathLike = "runs/cache",
    *,
    steps: int = CLASSIFIER_DEFAULTS["steps"],
    batch_size: int = CLASSIFIER_DEFAULTS["batch_size"],
    lr: float = CLASSIFIER_DEFAULTS["lr"],
    seed: int = CLASSIFIER_DEFAULTS["seed"],
    architecture: str = "cnn",
) -> Path:
    """Where :func:`load_or_train_digits_classifier` caches a classifier with these hyperparameters.

    Returns:
        ``cache_dir / "digits-classifier-<12 hex digits>.pt"`` (the CNN) or
        ``cache_dir / "digits-mlp-classifier-<12 hex digits>.pt"``.
    """
    return _cache_path(cache_dir, _classifier_file_prefix(architecture),
                       _classifier_hparams(steps, batch_size, lr, seed))


def load_or_train_digits_classifier(
    cache_dir: str | os.PathLike = "runs/cache",
    device: torch.device | str | None = None,
    *,
    steps: int = CLASSIFIER_DEFAULTS["steps"],
    batch_size: int = CLASSIFIER_DEFAULTS["batch_size"],
    lr: float = CLASSIFIER_DEFAULTS["lr"],
    seed: int = CLASSIFIER_DEFAULTS["seed"],
    architecture: str = "cnn",
) -> tuple[nn.Module, float]:
    """Return the digits classifier and its held-out accuracy, training and caching it on first use.

    The cache file (see :func:`classifier_cache_path`) holds ``{"model": state_dict,
    "accuracy": float, "hparams": dict, "version": str}``.

    Args:
        cache_dir: Folder of the cache (created if missing).
        device: Where to put (and train) the classifier; ``None`` picks CUDA when available.
        steps, batch_size, lr, seed: Training hyperparameters (see :func:`train_classifier`).
        architecture: ``"cnn"`` (:class:`DigitsClassifier`, the reward's) or ``"mlp"``
            (:class:`DigitsMLPClassifier`; :data:`HELD_OUT_CLASSIFIER`).

    Returns:
        ``(classifier, accuracy)``: the classifier on ``device`` in eval mode and its
        held-out accuracy in ``[0, 1]``.
    """
    device = _resolve_device(device)
    hparams = _classifier_hparams(steps, batch_size, lr, seed)
    path = classifier_cache_path(cache_dir, steps=steps, batch_size=batch_size, lr=lr, seed=seed,
                                 architecture=architecture)
    if path.exists():
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
        model = _classifier_class(architecture)()
        model.load_state_dict(ckpt["model"])
        return model.to(device).eval(), float(ckpt["accuracy"])

    from orwcfm_fast.data.digits import load_digits_images

    images, labels = load_digits_images()
    model, accuracy = train_classifier(
        images, labels, steps=steps, device=device, seed=seed, batch_size=batch_size, lr=lr, architecture=architecture
    )
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    _atomic_save({"model": state, "accuracy": float(accuracy), "hparams": hparams, "version": CACHE_VERSION}, path)
    return model.eval(), accuracy
