"""The image geometry of augmentation that both the train block's checks (frontend/train_spec.py)
and the runtime's augmenter (runtime/augment.py) need: an input's image shape, crop's window,
whether an augmentation fits the images."""
from __future__ import annotations

import math


def crop_window(size: int, image: tuple[int, int, int]) -> tuple[int, int]:
    """crop(size)'s window: `size` rows, and as many columns as keep the image's aspect ratio."""
    return size, max(1, round(size * image[2] / image[1]))


def image_shape(shape: tuple) -> tuple[int, int, int]:
    """(channels, height, width) of the images an input of `shape` (batch axis first) holds:
    [N, C, H, W], [N, H, W], or [N, D] with D a square (one channel, sqrt(D) on a side).
    A ValueError says what is needed otherwise."""
    dims = tuple(shape[1:])
    if not all(isinstance(d, int) for d in dims):
        raise ValueError("augment needs an input with fixed image sizes")
    if len(dims) == 3:
        return dims
    if len(dims) == 2:
        return (1, *dims)
    if len(dims) == 1 and math.isqrt(dims[0]) ** 2 == dims[0]:
        side = math.isqrt(dims[0])
        return 1, side, side
    raise ValueError("augment needs image inputs: [N, C, H, W], [N, H, W], or [N, D] with D a "
                     "square (one channel of sqrt(D) x sqrt(D), like MNIST's 784 = 28 x 28)")


def fit_problem(name: str, options: dict, image: tuple[int, int, int]) -> tuple[str, str] | None:
    """Why augmentation `name(options)` cannot work on images of `image` (C, H, W), as (the option
    at fault, the reason), or None when it can."""
    _, height, width = image
    if name == "shift" and options["pixels"] >= min(height, width):
        return "pixels", (f"shift({options['pixels']}) would move {height} x {width} images "
                          f"out of sight; shift by less than {min(height, width)}")
    if name == "crop":
        pad, window = options["pad"], crop_window(options["size"], image)
        if window[0] > height + 2 * pad or window[1] > width + 2 * pad:
            return "size", (f"crop({options['size']}, pad={pad}): the window is larger than the "
                            f"padded image ({height + 2 * pad} x {width + 2 * pad})")
    return None
