"""Images leave the loader workers as ``uint8`` and are normalised where the batch is used.

A model's training transform ends in "to float, then normalise" (``ToTensor`` + ``Normalize``
in torchvision's first API, ``ToDtype(float32, scale=True)`` + ``Normalize`` in ``v2``).
``fast_transform`` splits that tail off: the workers run the rest and hand over ``uint8``
images (a quarter of the bytes through shared memory, to the device and through the batch's
``torch.cat``; no float work in the workers), and ``normalize(batch)`` runs the same tail on
the whole batch where it is used (the device, on a GPU). Elementwise, in the same order on
the same values: the normalised images are bitwise those the whole transform gives.

Two more savings, for the random-resized-crop transform CLIP models train with (open_clip's
``preprocess_train``: ``RandomResizedCrop``, then ``convert("RGB")``, then the tail):

- **One crop-and-resize, in torch.** The crop is drawn with torchvision's own
  ``RandomResizedCrop.get_params`` (the same random draws, so the same crop), then cut as a
  view of the decoded pixels and resized by ``torch.nn.functional.interpolate`` with
  ``antialias=True`` on ``uint8``: PyTorch's kernel for PIL's filters (bicubic, bilinear),
  about four times faster here than PIL's ``crop`` + ``resize``. Both compute the same filter
  in fixed point and round in places differently: measured on 50 crops of 256 px photo-like
  JPEGs to 224 px (2026-12-05), 98.6% of pixel values are equal, 1.4% differ by one level
  of 255, fewer than two in a million by two or three (``tests/test_pixels.py`` holds the
  bound: none by more than three). One level is 0.015 after CLIP's normalisation. The
  kernel gives the same bytes under every CPU kernel set (AVX-512, AVX2, ``default``).
- **JPEGs decoded at reduced size where the crop allows** (PIL's ``draft``: the decoder's
  DCT scaling by 1/2, 1/4 or 1/8), only while the reduced crop keeps at least
  ``reducing_gap`` (2, Pillow's default for ``thumbnail``) times the output's side, and the
  crop box is then rounded out to the reduced image's pixels. This changes the image more
  than rounding does (a different, equally valid downscaling filter), and only for images at
  least twice the model's side: for img2dataset's usual 256 px shards and a 224 px model it
  never applies. ``reducing_gap=None`` turns it off.

Any other transform (colour jitter on PIL images before the tail, say) still hands over
``uint8``: its steps run on the PIL image as before, then the pixels are taken as they are.
A transform that does not end in such a tail is used as it is (float images).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torchvision import transforms as T
from torchvision.transforms import functional as TF
from torchvision.transforms import v2
from torchvision.transforms.functional import pil_to_tensor

from .augment import TwoViews

REDUCING_GAP = 2.0  # Pillow's default for thumbnail(): draft only to twice the output's side
_MODES = {
    T.InterpolationMode.BILINEAR: "bilinear",
    T.InterpolationMode.BICUBIC: "bicubic",
}


def _is_rgb_convert(step: Any) -> bool:
    """A step that only converts a PIL image to RGB (open_clip's ``MaybeConvertMode``, its
    older ``_convert_to_rgb``): nothing to do on the loader's images, which are RGB."""
    if getattr(step, "__name__", "") == "_convert_to_rgb":
        return True
    return type(step).__name__ == "MaybeConvertMode" and getattr(step, "mode", None) == "RGB"


def _v1_tail(steps: list) -> bool:
    return (
        len(steps) >= 2
        and isinstance(steps[-2], T.ToTensor)
        and isinstance(steps[-1], T.Normalize)
        and not steps[-1].inplace
    )


def _v2_tail(steps: list) -> bool:
    if len(steps) < 2 or not isinstance(steps[-1], v2.Normalize):
        return False
    to = steps[-2]
    return isinstance(to, v2.ToDtype) and to.dtype is torch.float32 and bool(to.scale)


class _Tail:
    """The float tail on a uint8 batch: ``ToTensor``'s own conversion (``to(float32)``, then
    ``/ 255``) or ``v2.ToDtype``'s (``* (1 / 255)``), then ``Normalize``'s ``- mean``,
    ``/ std``: the same operations in the same order, done in place in one new tensor (on a
    CPU, allocating a batch-sized tensor costs more than an elementwise pass over it). A
    class, not a closure, so that workers can unpickle it."""

    def __init__(self, norm: T.Normalize | v2.Normalize, v2_scale: bool):
        self.mean, self.std = list(norm.mean), list(norm.std)
        self.v2_scale = v2_scale

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = x.to(torch.float32)
        if self.v2_scale:
            y.mul_(1.0 / 255)
        else:
            y.div_(255)
        return TF.normalize(y, self.mean, self.std, inplace=True)


class Uint8Transform:
    """PIL image -> ``uint8`` ``[3, S, S]``; ``normalize(images)`` -> what the wrapped
    transform gives, for a batch (any leading dimensions) on any device.

    ``prepare(im)`` (optional, before the image is decoded) draws the crop and sets the JPEG
    decoder's reduction; ``__call__(image, plan)`` finishes with that plan."""

    def __init__(
        self,
        head: list,
        tail: Callable[[torch.Tensor], torch.Tensor],
        crop=None,
        reducing_gap: float | None = REDUCING_GAP,
    ):
        self.head = head
        self._tail = tail
        self.crop: T.RandomResizedCrop | None = crop
        self.reducing_gap = reducing_gap
        if crop is not None:
            self.size = tuple(crop.size)
            self.mode = _MODES[crop.interpolation]

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype != torch.uint8:
            raise TypeError(f"expected uint8 images, got {images.dtype}")
        return self._tail(images)

    # --- the worker's side ------------------------------------------------------------
    def prepare(self, im: Image.Image) -> tuple[int, int, int, int] | None:
        """The crop ``(top, left, height, width)`` in the decoded image's pixels, drawn
        before decoding so that a JPEG can be decoded at reduced size (``im`` is opened, not
        yet loaded). None without a fused crop."""
        if self.crop is None:
            return None
        W, H = im.size
        i, j, h, w = T.RandomResizedCrop.get_params(im, self.crop.scale, self.crop.ratio)
        if self.reducing_gap and im.format == "JPEG":
            need = self.reducing_gap * max(self.size[0] / h, self.size[1] / w)
            if need <= 0.5:  # a reduction by 2 at least keeps the gap
                im.draft(None, (math.ceil(W * need), math.ceil(H * need)))
                sx, sy = im.size[0] / W, im.size[1] / H
                if (sx, sy) != (1.0, 1.0):
                    top, left = math.floor(i * sy), math.floor(j * sx)
                    bottom = min(im.size[1], math.ceil((i + h) * sy))
                    right = min(im.size[0], math.ceil((j + w) * sx))
                    i, j, h, w = top, left, bottom - top, right - left
        return i, j, h, w

    def __call__(self, image: Image.Image, plan: tuple[int, int, int, int] | None = None):
        if self.crop is None:
            out = image
            for step in self.head:
                out = step(out)
            if isinstance(out, Image.Image):
                return pil_to_tensor(out)
            return out.as_subclass(torch.Tensor)  # v2: a uint8 tv_tensors.Image
        if plan is None:
            plan = self.prepare(image)
        if image.mode != "RGB":
            image = image.convert("RGB")  # what the skipped MaybeConvertMode would do
        i, j, h, w = plan
        pixels = torch.from_numpy(np.array(image))[i : i + h, j : j + w]  # [h, w, 3] view
        x = pixels.permute(2, 0, 1)[None]  # channels-last strides: the kernel's fast path
        if (h, w) != self.size:
            x = F.interpolate(x, size=self.size, mode=self.mode, antialias=True)
        return x[0].contiguous()


class Uint8TwoViews:
    """Two draws of a ``Uint8Transform``: ``[2, 3, S, S]`` uint8 (``TwoViews`` of it)."""

    def __init__(self, inner: Uint8Transform):
        self.inner = inner
        self.normalize = inner.normalize

    def __call__(self, image: Image.Image) -> torch.Tensor:
        return torch.stack([self.inner(image), self.inner(image)])


class WithCleanView:
    """An image's training view and its clean view, ``[2, 3, S, S]``: ``train``'s random
    draw, then ``clean`` (the evaluation transform: resize and centre crop, no random draw),
    for a detector that reads un-augmented similarities (``fnd.view=clean``). Both ``uint8``
    with one ``normalize`` (``with_clean_view`` checks that their tails agree), or both the
    model's float input (``normalize`` None)."""

    def __init__(self, train: Any, clean: Any, normalize: Callable | None):
        self.train, self.clean = train, clean
        if normalize is not None:
            self.normalize = normalize

    def prepare(self, im: Image.Image) -> tuple[int, int, int, int] | None:
        return self.train.prepare(im) if isinstance(self.train, Uint8Transform) else None

    def __call__(self, image: Image.Image, plan: tuple[int, int, int, int] | None = None):
        if isinstance(self.train, Uint8Transform):
            first = self.train(image, plan)
        else:
            first = self.train(image)
        return torch.stack([first, self.clean(image)])


def with_clean_view(train: Any, clean: Any) -> WithCleanView:
    """``train`` and ``clean`` (a model's ``preprocess_train`` and ``preprocess_val``) in one
    worker transform, on the ``uint8`` path where both end in the same float tail. JPEGs are
    decoded at full size (no ``draft``): the clean view is the whole image, so a reduction
    drawn for the training crop would change it."""
    fast_train, fast_clean = fast_transform(train, None), fast_transform(clean, None)
    if isinstance(fast_train, Uint8Transform) and isinstance(fast_clean, Uint8Transform):
        a, b = fast_train._tail, fast_clean._tail
        if (a.mean, a.std, a.v2_scale) == (b.mean, b.std, b.v2_scale):
            return WithCleanView(fast_train, fast_clean, fast_train.normalize)
    return WithCleanView(train, clean, None)


def fast_transform(transform: Any, reducing_gap: float | None = REDUCING_GAP) -> Any:
    """``transform`` as a ``Uint8Transform`` where it ends in a float-and-normalise tail (see
    the module docstring), else ``transform`` itself."""
    if isinstance(transform, TwoViews):
        inner = fast_transform(transform.transform, reducing_gap)
        return Uint8TwoViews(inner) if isinstance(inner, Uint8Transform) else transform
    steps = list(getattr(transform, "transforms", None) or [])
    if _v1_tail(steps):
        tail = _Tail(steps[-1], v2_scale=False)
        head = steps[:-2]
        crop = head[0] if head and isinstance(head[0], T.RandomResizedCrop) else None
        fused = (
            crop is not None
            and crop.interpolation in _MODES
            and crop.antialias is not False
            and all(_is_rgb_convert(s) for s in head[1:])
        )
        return Uint8Transform(head, tail, crop if fused else None, reducing_gap)
    if _v2_tail(steps):
        if not steps[:-2] or not isinstance(steps[0], v2.ToImage):
            return transform  # the head would not make a uint8 tensor of a PIL image
        return Uint8Transform(steps[:-2], _Tail(steps[-1], v2_scale=True), None, reducing_gap)
    return transform
