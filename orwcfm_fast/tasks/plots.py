"""PNG figures for the demo: sample grids and metric curves.

Uses matplotlib's object-oriented API with an explicit Agg canvas
(:class:`matplotlib.figure.Figure` + ``FigureCanvasAgg``), so it works headless and
never changes the global pyplot backend or state. matplotlib is imported on first use.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import torch

__all__ = ["make_grid", "save_curves", "save_sample_grid"]


def make_grid(samples: torch.Tensor, nrow: int = 8, padding: int = 1, pad_value: float = -1.0) -> torch.Tensor:
    """Tile images into one image.

    Args:
        samples: ``[N, C, H, W]`` images (``C`` is 1 or 3).
        nrow: Images per row.
        padding: Pixels between images.
        pad_value: Value of the padding pixels.

    Returns:
        ``[C, rows * (H + padding) + padding, nrow * (W + padding) + padding]`` float32 tensor,
        ``rows = ceil(N / nrow)``; unused cells hold ``pad_value``.
    """
    if samples.dim() != 4:
        raise ValueError(f"expected samples [N, C, H, W], got {tuple(samples.shape)}")
    n, c, h, w = samples.shape
    ncol = max(1, min(nrow, n))
    rows = max(1, math.ceil(n / ncol))
    grid = torch.full(
        (c, rows * (h + padding) + padding, ncol * (w + padding) + padding), float(pad_value), dtype=torch.float32
    )
    x = samples.detach().to("cpu", torch.float32)
    for i in range(n):
        r, q = divmod(i, ncol)
        top, left = padding + r * (h + padding), padding + q * (w + padding)
        grid[:, top : top + h, left : left + w] = x[i]
    return grid


def _new_figure(figsize: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=figsize)
    FigureCanvasAgg(fig)
    return fig


def save_sample_grid(
    samples: torch.Tensor,
    path: str | os.PathLike,
    nrow: int = 16,
    *,
    title: str | None = None,
    scale: int = 8,
) -> Path:
    """Save a grid of images in ``[-1, 1]`` as a PNG.

    Each pixel is repeated ``scale`` times in both directions (nearest neighbour) and
    drawn with ``interpolation="nearest"``, so 8x8 digits stay crisp. Values are
    clipped to ``[-1, 1]`` (black to white).

    Args:
        samples: ``[N, C, H, W]`` images in ``[-1, 1]``, ``C`` 1 (greyscale) or 3 (RGB).
        path: Output file (parent folders are created).
        nrow: Images per row.
        title: Optional figure title.
        scale: Nearest-neighbour upscaling factor per image pixel.

    Returns:
        The path written, as a :class:`~pathlib.Path`.
    """
    grid = make_grid(samples, nrow=nrow, pad_value=-0.4).clamp(-1.0, 1.0)
    grid = grid.repeat_interleave(scale, dim=1).repeat_interleave(scale, dim=2)
    img = ((grid + 1.0) / 2.0).permute(1, 2, 0).numpy()  # [H', W', C] in [0, 1]
    height, width = img.shape[:2]
    dpi = 100
    extra = 0.35 if title else 0.0
    fig = _new_figure((width / dpi, height / dpi + extra))
    ax = fig.add_axes((0.0, 0.0, 1.0, height / (height + extra * dpi)))
    if img.shape[2] == 1:
        ax.imshow(img[..., 0], cmap="gray", vmin=0.0, vmax=1.0, interpolation="nearest")
    else:
        ax.imshow(img, interpolation="nearest")
    ax.set_axis_off()
    if title:
        fig.suptitle(title, fontsize=10, y=1.0 - 0.05 * extra / (height / dpi + extra))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=dpi, format="png")
    return path


def save_curves(
    history: Sequence[Mapping[str, float]],
    keys: Iterable[str],
    path: str | os.PathLike,
    title: str | None = None,
    *,
    references: Mapping[str, Mapping[str, float]] | None = None,
    zero_based: bool = False,
) -> Path:
    """Plot per-epoch metrics, one panel per key, and save them as a PNG.

    The x axis is each entry's ``"epoch"`` when present, else its position in
    ``history``. Entries missing a key are skipped in that key's panel.

    Args:
        history: Per-epoch metric dicts, e.g. the list returned by ``ORWCFMTrainer.train``.
        keys: Metric names to plot (one panel each, side by side).
        path: Output file (parent folders are created).
        title: Optional figure title.
        references: Optional ``{key: {label: value}}``: dashed horizontal reference lines
            (with a legend) in that key's panel.
        zero_based: Start every y axis at 0 (unless a value is negative).

    Returns:
        The path written, as a :class:`~pathlib.Path`.
    """
    keys = list(keys)
    references = references or {}
    if not keys:
        raise ValueError("save_curves needs at least one key")
    fig = _new_figure((3.6 * len(keys), 3.0))
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    for ax, key in zip(axes, keys):
        xs, ys = [], []
        for i, entry in enumerate(history):
            if key in entry and entry[key] is not None:
                xs.append(float(entry.get("epoch", i)))
                ys.append(float(entry[key]))
        ax.plot(xs, ys, marker="o", markersize=3)
        refs = references.get(key, {})
        for j, (label, value) in enumerate(refs.items()):
            ax.axhline(float(value), linestyle="--", linewidth=1, color=f"C{j + 1}", label=label)
        if refs:
            ax.legend(fontsize=8, loc="best")
        if zero_based and all(y >= 0 for y in ys) and all(float(v) >= 0 for v in refs.values()):
            ax.set_ylim(bottom=0.0)
        ax.set_xlabel("epoch")
        ax.set_title(key)
        ax.grid(True, alpha=0.3)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100, format="png")
    return path
