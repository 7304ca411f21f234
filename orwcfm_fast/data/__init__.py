"""Small bundled datasets for demos and tests (no downloads).

- :func:`load_digits_images`: scikit-learn's 8x8 handwritten digits as ``[N, 1, 8, 8]`` in ``[-1, 1]``.
"""

from orwcfm_fast.data.digits import DIGITS_NUM_CLASSES, DIGITS_SHAPE, load_digits_images

__all__ = ["DIGITS_NUM_CLASSES", "DIGITS_SHAPE", "load_digits_images"]
