"""One training step's loss for image-text (CLIP) training: batch -> features -> loss.

The only place where the pieces meet: features are gathered (``clipfnd.distributed``),
detectors turn detached similarities into false-negative masks (``clipfnd.fnd``), the loss
math consumes features and masks (``clipfnd.losses``), and the per-sample tables
(``clipfnd.state``) are read, then written once per step with every rank's new rows.

Order inside a step, for each anchor type (image anchors vs texts, text anchors vs images):
1. with GloFND, similarities of this rank's anchors against the gathered batch (a detached
   copy for the detector);
2. false-negative masks from the thresholds *before* this step's update (from
   ``fnd.start_mask`` on);
3. GloFND's threshold update from the same similarities (from ``fnd.start_update`` on);
4. the loss (CLIP, or the global loss with its ``u`` update);
5. ``commit``: one ``write_rows`` for every table row changed (all ranks' rows, so replicas
   agree). The training loop holds the rows of every micro-batch of an optimiser step and
   commits them only when the step is really taken: a step skipped for a non-finite loss or
   gradient, or by the fp16 gradient scaler, leaves every table as it was.

Repeated dataset indices in one global batch (possible with ``data.resampled=true``, where
ranks draw shards independently): a column holding another copy of the anchor's own sample is
neither its positive nor a negative. It is left out of ``N_i`` everywhere (the loss, the
detector's flags and its gradient's ``|N_i|``, the detection counts), and counted in
``StepOutput.duplicates``. Each sample's table rows are written once per optimiser step, by
its first occurrence in the gathered batch (``StateTables.write_rows``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from .. import distributed
from ..config import Config
from ..fnd import GloFND, detection_counts, detection_metrics, same_label
from ..losses import (
    attraction,
    clip_loss,
    gamma_schedule,
    global_contrastive_loss,
    kept_negatives,
    negative_ratio,
    temperature_terms,
)
from ..state import StateTables

ANCHORS = ("img", "txt")


@dataclass
class StepOutput:
    loss: torch.Tensor
    metrics: dict[str, float] = field(default_factory=dict)
    detection: torch.Tensor | None = None  # summed counts, see fnd.detection_counts
    index: torch.Tensor | None = None  # this rank's dataset indices
    rows: dict[str, torch.Tensor] = field(default_factory=dict)  # new table rows, not yet written
    duplicates: int = 0  # samples of the global batch whose dataset index came earlier in it


class ClipObjective:
    """Loss of one batch for CLIP training, with optional false-negative detection.

    Args:
        cfg: the run config (``loss`` and ``fnd`` sections are read).
        tables: per-sample tables of the training set (GloFND thresholds, ``u`` estimators).
        has_labels: the data carries labels (enables the oracle and detection quality).
    """

    def __init__(self, cfg: Config, tables: StateTables, has_labels: bool):
        self.cfg = cfg
        self.tables = tables
        self.has_labels = has_labels
        self.loss_name = cfg.loss.name
        self.fnd = cfg.fnd
        self.glofnd: GloFND | None = None
        if cfg.fnd.detector == "oracle" and not has_labels:
            raise ValueError(
                "fnd.detector=oracle needs labels, and the training data has none "
                "(its manifest lists no label_names)"
            )
        if cfg.fnd.detector == "glofnd":
            f = cfg.fnd
            self.glofnd = GloFND(
                tables, ANCHORS, alpha=f.alpha, lr=f.lr, optimizer=f.optimizer,
                beta1=f.beta1, beta2=f.beta2, init_threshold=f.init_threshold,
                bias_correction=f.bias_correction,
            )
        if self.loss_name != "clip":
            for t in ANCHORS:
                tables.add(f"gcl.u_{t}", 0.0)
                tables.add(f"gcl.visits_{t}", 0.0)

    # ------------------------------------------------------------------------------------
    def temperature(self, logit_scale: torch.Tensor) -> torch.Tensor:
        """``tau`` for the global losses: the constant, or the learned ``1 / logit_scale``."""
        if self.loss_name == "sogclr":
            return torch.tensor(self.cfg.loss.tau, device=logit_scale.device)
        return 1.0 / logit_scale

    def masking(self, epoch: int) -> bool:
        return self.fnd.detector != "none" and epoch >= self.fnd.start_mask

    def updating(self, epoch: int) -> bool:
        return self.glofnd is not None and epoch >= self.fnd.start_update

    def __call__(
        self,
        image_features: torch.Tensor,
        text_features: torch.Tensor,
        logit_scale: torch.Tensor,
        index: torch.Tensor,
        label: torch.Tensor,
        epoch: int,
        measure: bool = True,
    ) -> StepOutput:
        """Loss of this rank's anchors.

        Args:
            image_features, text_features: ``[b, d]`` normalised features of this rank.
            logit_scale: ``1/tau`` as the model outputs it (``exp`` of its parameter).
            index, label: ``[b]`` dataset indices and labels (-1: none) of this rank's samples.
            epoch: the current epoch (schedules).
            measure: also count detection quality (the training loop asks on logged steps).
        """
        dtype = torch.promote_types(image_features.dtype, torch.float32)  # bf16/fp16 -> fp32
        img = image_features.to(dtype)
        txt = text_features.to(dtype)
        b = img.shape[0]
        self.tables.check_indices(index)
        img_all = distributed.gather_with_grad(img)
        txt_all = distributed.gather_with_grad(txt)
        label_all = distributed.gather(label)
        index_all = distributed.gather(index)
        offset = distributed.label_offset(b)
        pos = torch.arange(b, device=img.device) + offset
        others = {"img": txt_all, "txt": img_all}
        anchors = {"img": img, "txt": txt}
        labels_local = label.to(img.device)

        # N_i: the other B-1 samples of the other modality, less copies of the anchor's sample
        duplicates = index_all.numel() - torch.unique(index_all).numel()
        copies: torch.Tensor | None = None
        num_neg: int | torch.Tensor = img_all.shape[0] - 1
        if duplicates:
            copies = index.to(img.device)[:, None] == index_all.to(img.device)[None, :]
            copies[torch.arange(b, device=img.device), pos] = False
            num_neg = num_neg - copies.sum(1)

        masks: dict[str, torch.Tensor | None] = {t: None for t in ANCHORS}
        new_rows: dict[str, torch.Tensor] = {}
        masking, updating = self.masking(epoch), self.updating(epoch)
        truth: dict[str, torch.Tensor] = {}
        measure = measure and masking
        if self.has_labels and (measure or (masking and self.fnd.detector == "oracle")):
            same = same_label(labels_local, label_all.to(img.device), pos)
            if copies is not None:
                same &= ~copies
            truth = {t: same for t in ANCHORS}  # one label per sample: same truth both ways
        if self.fnd.detector == "oracle" and masking:
            masks = dict(truth)
        elif self.glofnd is not None and (masking or updating):
            for t in ANCHORS:  # one set of flags, from the thresholds before this update
                lam = self.glofnd.thresholds(t, index).to(img.device)
                with torch.no_grad():
                    sim = anchors[t] @ others[t].T
                flags = self.glofnd.flags(sim, lam, [pos])
                if copies is not None:
                    flags &= ~copies
                if masking:
                    masks[t] = flags
                if updating:
                    new_rows.update(self.glofnd.update_from_flags(t, index.to(img.device), [flags], num_neg,
                                                                  epoch=epoch))

        metrics: dict[str, float] = {}
        if self.loss_name == "clip":
            loss = clip_loss(
                img, txt, img_all, txt_all, logit_scale, offset,
                masks["img"], masks["txt"], self.fnd.removal, self.fnd.rescale, not_negative=copies,
            )
        else:
            loss, rows = self._global_loss(anchors, others, pos, masks, copies, index, logit_scale, epoch, metrics)
            new_rows.update(rows)
        detection = None
        if measure:
            detection = sum(
                detection_counts(masks[t], truth[t] if truth else torch.zeros_like(masks[t]), num_neg)
                for t in ANCHORS
            )
        return StepOutput(loss=loss, metrics=metrics, detection=detection,
                          index=index.to(img.device), rows=new_rows, duplicates=duplicates)

    def commit(self, outs: StepOutput | list[StepOutput]) -> None:
        """Write the new rows of one or more micro-batches (one optimiser step) into every
        replica, in one write (a collective: all ranks call it with as many outputs)."""
        outs = [outs] if isinstance(outs, StepOutput) else [o for o in outs if o.index is not None]
        if not outs:
            return
        names = set(outs[0].rows)
        if any(set(o.rows) != names for o in outs):
            raise ValueError("the micro-batches of one optimiser step changed different tables")
        index = torch.cat([o.index for o in outs])
        self.tables.write_rows(index, {n: torch.cat([o.rows[n] for o in outs]) for n in names})

    def _global_loss(self, anchors, others, pos, masks, copies, index, logit_scale, epoch, metrics):
        tau = self.temperature(logit_scale)
        gamma = gamma_schedule(epoch, self.cfg.loss.gamma_min, self.cfg.loss.gamma_decay_epochs)
        loss = torch.zeros((), device=pos.device)
        rows: dict[str, torch.Tensor] = {}
        dev = pos.device
        for t in ANCHORS:
            sim = anchors[t] @ others[t].T  # with gradient
            kept = kept_negatives(pos, tuple(sim.shape), masks[t], self.fnd.removal, dev, not_negative=copies)
            g = negative_ratio(sim, pos, tau, kept)
            u_old = self.tables.rows(f"gcl.u_{t}", index, dev)
            visits = self.tables.rows(f"gcl.visits_{t}", index, dev)
            gam = torch.where(visits > 0, torch.full_like(u_old, gamma), torch.ones_like(u_old))
            u_new = (1 - gam) * u_old + gam * g.detach()
            att = attraction(sim, pos, masks[t]) if (masks[t] is not None and self.fnd.removal == "attract") else None
            loss = loss + 0.5 * global_contrastive_loss(g, u_new.clamp(min=1e-30), tau, att)
            if self.loss_name == "fastclip_v3":  # rho * tau is added once below
                loss = loss + 0.5 * temperature_terms(u_new.clamp(min=1e-30), tau, rho=0.0)
            rows[f"gcl.u_{t}"] = u_new
            rows[f"gcl.visits_{t}"] = visits + 1
        if self.loss_name == "fastclip_v3":
            loss = loss + self.cfg.loss.rho * tau
        metrics["tau"] = float(tau.detach()) if torch.is_tensor(tau) else float(tau)
        metrics["gamma"] = gamma
        return loss, rows

    def summarise(self, detection: torch.Tensor | None) -> dict[str, float]:
        """Detection quality from counts summed over ranks (and steps)."""
        if detection is None:
            return {}
        return detection_metrics(detection, "fnd/", with_truth=self.has_labels)

    def threshold_metrics(self) -> dict[str, float]:
        if self.glofnd is None:
            return {}
        out: dict[str, float] = {}
        for t in ANCHORS:
            out.update({f"fnd/{k}": v for k, v in self.glofnd.threshold_quantiles(t).items()})
        return out


def clamp_logit_scale(logit_scale: torch.nn.Parameter, loss_name: str, tau_min: float) -> None:
    """Keep ``logit_scale`` in [0, ln 100] (CLIP, as open_clip does) or in [0, ln(1/tau_min)]."""
    upper = math.log(100.0) if loss_name == "clip" else math.log(1.0 / tau_min)
    with torch.no_grad():
        logit_scale.clamp_(0.0, upper)
