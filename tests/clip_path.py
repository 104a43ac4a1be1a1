"""The bimodal CLIP loss of a rank's anchors, computed by the path training runs (the ``clip``
method over both anchor types), for tests that compare with it."""

from __future__ import annotations

import torch

from clipfnd.config import load_config
from clipfnd.methods import AnchorRows, Clip
from clipfnd.state import StateTables


def clip_loss(
    image, text, image_all, text_all, logit_scale, offset=0, fn_i2t=None, fn_t2i=None,
    removal="eliminate", rescale=True,
):  # fmt: skip
    """The bimodal loss as training computes it: the ``clip`` method over both anchor types
    (this rank's ``[b, d]`` anchors against the gathered ``[B, d]``, positives at ``offset``)."""
    cfg = load_config(None, ["data.train=x", f"fnd.removal={removal}", f"fnd.rescale={rescale}"])
    method = Clip.from_config(cfg, StateTables(1), ("img", "txt"))
    pos = torch.arange(image.shape[0]) + offset
    rows = {
        "img": AnchorRows(image, text_all, pos, fn_i2t),
        "txt": AnchorRows(text, image_all, pos, fn_t2i),
    }
    return method.loss(rows, pos, logit_scale, 0).loss
