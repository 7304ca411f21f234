"""JPEG (in)compressibility reward (the DDPO / ORW-CFM-W2 compression task)."""

from __future__ import annotations

import io

import numpy as np
import torch

from orwcfm_fast.rewards.base import Reward

__all__ = ["JPEGCompressibility", "images_to_uint8"]


def images_to_uint8(images: torch.Tensor) -> np.ndarray:
    """Converts ``[B, C, H, W]`` images in ``[-1, 1]`` to ``[B, H, W, C]`` uint8 on the CPU.

    Uses ``round((x + 1) * 127.5)`` clamped to ``[0, 255]``.

    Args:
        images: ``[B, C, H, W]`` tensor in ``[-1, 1]`` (any device, any float dtype).

    Returns:
        ``[B, H, W, C]`` uint8 numpy array.
    """
    x = images.detach().to("cpu", torch.float32)
    x = torch.round((x + 1.0) * 127.5).clamp_(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).contiguous().numpy()


class JPEGCompressibility(Reward):
    """Negative JPEG file size in kilobytes (``bytes / 1000``).

    Each image is quantised to uint8 (:func:`images_to_uint8`), encoded with PIL as JPEG at
    ``quality`` in memory, and scored ``-len(jpeg_bytes) / 1000``; with
    ``incompressibility=True`` the sign is flipped (``+len / 1000``). Encoding runs on the CPU;
    the result is returned on the input's device. Not differentiable.

    Args:
        quality: JPEG quality, 1..95 (PIL's useful range; 95 by default as in DDPO).
        incompressibility: reward large files instead of small ones.

    Shapes:
        samples ``[B, C, H, W]`` with ``C`` in {1, 3} (1 -> PIL mode "L", 3 -> "RGB") -> ``[B]``.
    """

    input_range = (-1.0, 1.0)  # images in [-1, 1], the pixel tasks' convention

    def __init__(self, quality: int = 95, incompressibility: bool = False):
        super().__init__()
        quality = int(quality)
        if not 1 <= quality <= 100:
            raise ValueError(f"JPEG quality must be in [1, 100], got {quality}")
        self.quality = quality
        self.incompressibility = bool(incompressibility)

    def jpeg_sizes(self, samples: torch.Tensor) -> list:
        """JPEG sizes in bytes.

        Args:
            samples: ``[B, C, H, W]`` in ``[-1, 1]``, ``C`` in {1, 3}.

        Returns:
            list of ``B`` ints.
        """
        from PIL import Image

        if samples.dim() != 4 or samples.shape[1] not in (1, 3):
            raise ValueError(
                "JPEG compressibility needs images [B, C, H, W] with C in {1, 3}, "
                f"got shape {list(samples.shape)}"
            )
        arrays = images_to_uint8(samples)
        sizes = []
        for arr in arrays:
            # uint8 [H, W] -> mode "L"; uint8 [H, W, 3] -> mode "RGB"
            img = Image.fromarray(arr[:, :, 0] if arr.shape[2] == 1 else arr)
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=self.quality)
            sizes.append(buf.tell())
        return sizes

    def forward(self, samples: torch.Tensor) -> torch.Tensor:
        """Scores a batch of images.

        Args:
            samples: ``[B, C, H, W]`` in ``[-1, 1]``, ``C`` in {1, 3}.

        Returns:
            ``[B]`` float32 on ``samples.device``: ``-kB`` (or ``+kB`` with ``incompressibility``).

        Raises:
            ValueError: if ``samples`` is not a 4-D batch with 1 or 3 channels.
        """
        kb = torch.tensor(self.jpeg_sizes(samples), dtype=torch.float32) / 1000.0
        out = kb if self.incompressibility else -kb
        return out.to(samples.device)

    def extra_repr(self) -> str:
        return f"quality={self.quality}, incompressibility={self.incompressibility}"
