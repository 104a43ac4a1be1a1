"""Vision-only methods (``mode: simclr``), over the two views of each image: ``simclr``
(NT-Xent) and the debiased family ``dcl``, ``hcl``, ``sscl`` (docs/methods.md, "SimCLR /
NT-Xent" and "SSCL"). The global loss ``sogclr`` serves this mode too (``global_contrastive``).
The formulas live in ``clipfnd.losses.unimodal``; these classes hold the knobs.

All of them train at the constant temperature ``loss.tau``. SSCL's synthetic negatives are
drawn per anchor from a generator seeded by the run's seed, the epoch and the global batch's
dataset indices, one draw per global row: the same numbers on any number of processes, and
again after a resume.
"""

from __future__ import annotations

import hashlib
from typing import TYPE_CHECKING

import numpy as np
import torch

from ..losses.unimodal import debiased_rows, draw_mixing
from .base import AnchorRows, ConstantTemperature, MethodOutput
from .clip import Clip

if TYPE_CHECKING:
    from ..config import Config
    from ..state import StateTables


class SimCLR(ConstantTemperature, Clip):
    """NT-Xent: InfoNCE of every view against the other ``2B - 1`` views (its own column is no
    negative), averaged over the ``2B`` views; flagged false negatives removed or attracted as
    in CLIP."""

    name = "simclr"
    modes = ("simclr",)


class Debiased(ConstantTemperature, Clip):
    """The DCL / HCL / SSCL loss: hardness weights ``exp(beta s / t)``, debiasing prior
    ``tau_plus``, and (SSCL) ``num_synthetic`` negatives mixed from each anchor's ``top_k``
    hardest. Flagged false negatives leave the negative pool (``eliminate`` only)."""

    modes = ("simclr",)
    synthesis = False
    hard = True

    def __init__(self, cfg: Config, tables: StateTables, anchor_types: tuple[str, ...]):
        super().__init__(cfg, tables, anchor_types)
        c = cfg.loss
        self.tau, self.tau_plus = c.tau, c.tau_plus
        self.beta = c.beta if self.hard else 0.0
        self.top_k, self.num_synthetic, self.seed = c.top_k, c.num_synthetic, cfg.seed

    def mixing(self, r: AnchorRows, excluded: torch.Tensor, epoch: int):
        """SSCL's draws for this rank's rows (None: no synthesis, or too few negatives)."""
        if not self.synthesis:
            return None
        if r.self_col is None or r.columns_index is None:
            raise ValueError("SSCL needs the rows' global columns (AnchorRows.self_col)")
        m = r.others.shape[0]
        available = int(((~excluded).sum(1) - 1).min())  # the positive is no negative
        top_k = min(self.top_k, available)
        if top_k < 2:
            return None
        batch = r.columns_index.detach().cpu().numpy().astype("<i8").tobytes()
        digest = int.from_bytes(hashlib.blake2b(batch, digest_size=4).digest(), "little")
        seed = np.random.SeedSequence([self.seed & 0xFFFFFFFF, epoch, digest, 0x55C1])
        gen = torch.Generator().manual_seed(int(seed.generate_state(1, np.uint64)[0] >> 1))
        draws = draw_mixing(m, top_k, self.num_synthetic, gen)  # one per global row
        rows = r.self_col.cpu()
        dev = r.anchors.device
        draws.a, draws.b, draws.m = (x[rows].to(dev) for x in (draws.a, draws.b, draws.m))
        return draws

    def loss(
        self,
        rows: dict[str, AnchorRows],
        index: torch.Tensor,
        logit_scale: torch.Tensor,
        epoch: int,
    ) -> MethodOutput:
        per_type = []
        for r in rows.values():
            # the pairs' columns that are no negatives (the view's own column among them),
            # and the flagged false negatives: out of the negative pool
            excluded = r.not_negative if r.fn_mask is None else r.not_negative | r.fn_mask
            per_type.append(
                debiased_rows(
                    r.anchors,
                    r.others,
                    r.pos,
                    r.self_col,
                    self.tau,
                    self.tau_plus,
                    self.beta,
                    mixing=self.mixing(r, excluded, epoch),
                    not_negative=excluded,
                ).mean()
            )
        return MethodOutput(torch.stack(per_type).mean())


class DCL(Debiased):
    """Chuang et al., NeurIPS 2020: debiasing only (``beta = 0``, no synthesis)."""

    name = "dcl"
    hard = False


class HCL(Debiased):
    """Robinson et al., ICLR 2021: debiasing and hardness weighting, no synthesis."""

    name = "hcl"


class SSCL(Debiased):
    """Dong et al., arXiv 2304.02971: HCL over the negatives plus synthetic hard ones."""

    name = "sscl"
    synthesis = True
