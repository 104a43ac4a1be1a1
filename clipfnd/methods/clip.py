"""``clip``: the mini-batch contrastive loss, both directions (docs/methods.md, "Base losses")."""

from __future__ import annotations

import torch

from ..losses import info_nce_rows
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
        per_type = [
            info_nce_rows(
                r.anchors,
                r.others,
                r.pos,
                logit_scale,
                r.fn_mask,
                self.removal,
                self.rescale,
                r.not_negative,
            ).mean()
            for r in rows.values()
        ]
        loss = torch.stack(per_type).mean()  # 1/2 (image -> text + text -> image)
        return MethodOutput(loss)
