"""SimCLR's augmentations (Chen et al., ICML 2020, appendix A), built from
``torchvision.transforms.v2``: random resized crop, horizontal flip, colour jitter (p = 0.8),
grayscale (p = 0.2) and Gaussian blur (p = 0.5), then normalisation; and ``TwoViews``, which
makes the two views of one image that the vision-only losses compare.

The loader seeds torch's RNG per sample (``seed, epoch, rank, worker, position``) around the
image transform, so both views of a sample are the same whatever the number of workers and
after a resume.

For small images (32 px, digits) the blur kernel is about a tenth of the image side and odd,
as SimCLR uses for CIFAR-size inputs, and ``strength`` scales the colour jitter (SimCLR's
``s``: 1.0 for ImageNet, 0.5 for CIFAR).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from PIL import Image
from torchvision.transforms import v2

# ImageNet statistics, as SimCLR and torchvision's ResNets use them
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def simclr_augment(
    size: int,
    strength: float = 1.0,
    scale: tuple[float, float] = (0.08, 1.0),
    blur: bool = True,
    mean: Sequence[float] = MEAN,
    std: Sequence[float] = STD,
) -> v2.Compose:
    """One random view of a PIL image as a normalised float tensor ``[3, size, size]``."""
    if size < 8:
        raise ValueError(f"size must be >= 8, got {size}")
    if strength < 0:
        raise ValueError(f"strength must be >= 0, got {strength}")
    s = strength
    steps: list = [
        v2.ToImage(),
        v2.RandomResizedCrop(size, scale=scale, antialias=True),
        v2.RandomHorizontalFlip(),
        v2.RandomApply([v2.ColorJitter(0.8 * s, 0.8 * s, 0.8 * s, 0.2 * s)], p=0.8),
        v2.RandomGrayscale(p=0.2),
    ]
    if blur:
        kernel = max(3, (size // 10) | 1)  # odd, about a tenth of the side
        steps.append(v2.RandomApply([v2.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=0.5))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(steps)


class TwoViews:
    """``[2, 3, size, size]``: two independent draws of ``transform`` of the same image."""

    def __init__(self, transform):
        self.transform = transform

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return torch.stack([self.transform(image), self.transform(image)])
