"""``clip``: the mini-batch contrastive loss, both directions (docs/methods.md, "Base losses")."""

from __future__ import annotations

import torch

from ..losses import contrastive_rows
from .base import AnchorRows, Method, MethodOutput


class Clip(Method):
    """Mini-batch InfoNCE over each anchor type's rows, averaged over anchor types; the
    temperature is the model's learned ``logit_scale``, clamped at ``ln 100`` as open_clip does."""

    name = "clip"

    def loss(
        self,
        rows: dict[str, AnchorRows],
        index: torch.Tensor,
        logit_scale: torch.Tensor,
        epoch: int,
    ) -> MethodOutput:
        per_type = []
        for r in rows.values():
            logits = logit_scale * r.anchors @ r.others.T
            per_type.append(
                contrastive_rows(
                    logits, r.pos, r.fn_mask, self.removal, self.rescale, r.not_negative
                )
            )
        if len(per_type) == 2:  # the bidirectional CLIP loss, as clip_loss computes it
            loss = 0.5 * (per_type[0].mean() + per_type[1].mean())
        else:
            loss = torch.stack([p.mean() for p in per_type]).mean()
        return MethodOutput(loss)
