"""scikit-learn's 8x8 handwritten digits as image tensors.

The data (1797 greyscale 8x8 images of the digits 0-9, pixel values 0..16) ship
with scikit-learn, so nothing is downloaded. Nothing is loaded at import time.
"""

from __future__ import annotations

import torch

__all__ = ["DIGITS_NUM_CLASSES", "DIGITS_SHAPE", "load_digits_images"]

#: Shape ``(C, H, W)`` of one digit image.
DIGITS_SHAPE = (1, 8, 8)
#: Number of digit classes.
DIGITS_NUM_CLASSES = 10
_MAX_PIXEL = 16.0


def load_digits_images(dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """Load scikit-learn's digits as images scaled to ``[-1, 1]``.

    Pixel values ``v`` in ``0..16`` map to ``v / 8 - 1`` (0 -> -1 background, 16 -> +1 ink).

    Args:
        dtype: Floating dtype of the returned images.

    Returns:
        A tuple ``(images, labels)``:

        - images: ``[1797, 1, 8, 8]`` tensor of ``dtype`` with values in ``[-1, 1]``.
        - labels: ``[1797]`` int64 tensor of digit classes ``0..9``.
    """
    from sklearn.datasets import load_digits  # deferred: keeps package import cheap

    bunch = load_digits()
    pixels = torch.as_tensor(bunch.images, dtype=torch.float64)  # [N, 8, 8], 0..16
    images = (pixels * (2.0 / _MAX_PIXEL) - 1.0).unsqueeze(1).to(dtype)
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    return images.contiguous(), labels.contiguous()
