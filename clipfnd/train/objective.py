"""One training step's loss: features -> masks -> loss -> rows, for image-text (CLIP) training
(``ClipObjective``) and vision-only training over two views (``SimCLRObjective``).

The only place where the pieces meet. It never branches on a method's or a detector's name:
- features are gathered (``clipfnd.distributed``);
- the detector (``clipfnd.fnd``, one of ``DETECTORS``) turns detached similarities, labels
  and the epoch into false-negative flags, and the rows of its tables to write;
- the method (``clipfnd.methods``, one of ``METHODS``) turns features and flags into the
  loss, and the rows of its tables to write;
- ``commit`` writes every table row of a step in one synchronised call. The training loop
  holds the rows of every micro-batch of an optimiser step and commits them only when the
  step is really taken: a step skipped for a non-finite loss or gradient, or by the fp16
  gradient scaler, leaves every table as it was.

Order inside a step: flags come from the detector's state *before* this step's update (for
GloFND: the thresholds before this step's update; from ``fnd.start_mask`` on), the detector's
update uses the same similarities (from ``fnd.start_update`` on), then the loss.

Repeated dataset indices in one global batch (possible with ``data.resampled=true``, where
ranks draw shards independently): a column holding another copy of the anchor's own sample is
neither its positive nor a negative. It is left out of ``N_i`` everywhere (the loss, the
detector's flags and its gradient's ``|N_i|``, the detection counts), and counted in
``StepOutput.duplicates``. Each sample's table rows are written once per optimiser step, by
its first occurrence in the gathered batch (``StateTables.write_rows``).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from contextlib import AbstractContextManager
from dataclasses import dataclass, field

import torch

from .. import distributed
from ..config import Config, ConfigError
from ..fnd import DETECTORS, DetectionInput, detection_counts, detection_metrics, same_label
from ..losses.unimodal import view_columns
from ..methods import METHODS, AnchorRows
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
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # the detector's (this rank's)
    masked: bool = False  # the loss used the detector's flags


class Objective(ABC):
    """What both modes share: the method, the detector, and writing a step's rows.

    Args:
        cfg: the run config (``loss`` picks the method, ``fnd`` the detector).
        tables: per-sample tables of the training set (the method's and the detector's).
        has_labels: the data carries labels (enables the oracle and detection quality).
    """

    anchor_types: tuple[str, ...] = ANCHORS

    def __init__(self, cfg: Config, tables: StateTables, has_labels: bool):
        self.tables = tables
        self.has_labels = has_labels
        detector_cls = DETECTORS[cfg.fnd.detector]
        if detector_cls.needs_labels and not has_labels:
            raise ConfigError(
                f"fnd.detector={cfg.fnd.detector} needs labels, and the training data has none "
                "(its manifest lists no label_names)"
            )
        self.detector = detector_cls.from_config(
            cfg.fnd,
            tables,
            self.anchor_types,
            seed=cfg.seed,
            last_epoch=cfg.train.epochs - 1,
            progress=cfg.train.progress,
        )
        self.method = METHODS[cfg.loss.name](cfg, tables, self.anchor_types)

    @abstractmethod
    def features(
        self, model: torch.nn.Module, batch: dict, device: torch.device
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """``(per-sample feature tensors, each [b, d]; logit_scale)`` of one batch."""

    @abstractmethod
    def loss_from(
        self,
        feats: tuple[torch.Tensor, ...],
        logit_scale: torch.Tensor,
        index: torch.Tensor,
        label: torch.Tensor,
        epoch: int,
        measure: bool,
    ) -> StepOutput:
        """This rank's loss and rows from ``features``' output (rows in the same order)."""

    def batch_loss(
        self, model: torch.nn.Module, batch: dict, device: torch.device, epoch: int, measure: bool
    ) -> StepOutput:
        """Forward ``batch`` through ``model`` and return this rank's loss and rows."""
        feats, logit_scale = self.features(model, batch, device)
        return self.loss_from(
            feats, logit_scale, batch["index"].to(device), batch["label"].to(device), epoch, measure
        )

    def accumulated(
        self,
        model: torch.nn.Module,
        batches: list[dict],
        device: torch.device,
        epoch: int,
        measure: bool,
        backward: Callable[[torch.Tensor], None],
        sync: Callable[[bool], AbstractContextManager],
        all_finite: Callable[[torch.Tensor], bool],
    ) -> StepOutput | None:
        """One optimiser step's loss and gradients over ``k = len(batches)`` micro-batches, as
        if they were one batch (open_clip's ``--accum-freq``): the loss, the detector's flags
        and updates and the method's estimators all see the whole accumulated batch.

        A forward without gradients caches every micro-batch's features; then, micro-batch by
        micro-batch, a forward with gradients replaces its cached rows, the loss over the
        whole accumulated batch is computed and ``backward`` runs. The sum of the ``k``
        backward passes is the gradient of the whole batch's loss: each pass carries the
        gradient through one micro-batch's features, and the temperature's (a term that does
        not go through features) only in the last pass, the one whose gradients are
        synchronised (``sync(last)`` is DDP's ``no_sync`` for the others). The inputs (the
        augmented views) are the same tensors in both forwards. Returns the last pass's
        output (its rows are committed by the caller), or None when the loss is not finite
        on some rank (``all_finite``; nothing was backpropagated then).
        """
        k = len(batches)
        with torch.no_grad():
            cached = [self.features(model, b, device)[0] for b in batches]
        index = torch.cat([b["index"] for b in batches]).to(device)
        label = torch.cat([b["label"] for b in batches]).to(device)
        out = None
        for j, batch in enumerate(batches):
            last = j == k - 1
            with sync(last):
                live, logit_scale = self.features(model, batch, device)
                parts = [live if i == j else cached[i] for i in range(k)]
                feats = tuple(torch.cat([p[c] for p in parts]) for c in range(len(live)))
                scale = logit_scale if last else logit_scale.detach()
                out = self.loss_from(feats, scale, index, label, epoch, measure and last)
                if not all_finite(out.loss.detach()):
                    return None
                backward(out.loss)
        return out

    def commit(self, outs: StepOutput | list[StepOutput]) -> dict[str, float]:
        """Write the new rows of one or more micro-batches (one optimiser step) into every
        replica, in one write, and hand the detector the step's statistics summed over the
        micro-batches and every rank (collectives: all ranks call it with as many outputs).
        Returns what the detector says of the step (the step masking started at, once)."""
        outs = [outs] if isinstance(outs, StepOutput) else [o for o in outs if o.index is not None]
        if not outs:
            return {}
        names = set(outs[0].rows)
        if any(set(o.rows) != names for o in outs):
            raise ValueError("the micro-batches of one optimiser step changed different tables")
        index = torch.cat([o.index for o in outs])
        self.tables.write_rows(index, {n: torch.cat([o.rows[n] for o in outs]) for n in names})
        stats: dict[str, torch.Tensor] = {}
        for o in outs:
            for key, value in o.stats.items():
                stats[key] = stats[key] + value if key in stats else value
        if stats:
            keys = sorted(stats)
            summed = distributed.all_reduce_sum(torch.cat([stats[k].flatten() for k in keys]))
            sizes = [stats[k].numel() for k in keys]
            stats = {k: v.view_as(stats[k]) for k, v in zip(keys, summed.split(sizes), strict=True)}
        return self.detector.after_step(stats, masked=any(o.masked for o in outs))

    def summarise(self, detection: torch.Tensor | None) -> dict[str, float]:
        """Detection quality from counts summed over ranks (and steps)."""
        if detection is None:
            return {}
        return detection_metrics(detection, "fnd/", with_truth=self.has_labels)

    def threshold_metrics(self) -> dict[str, float]:
        return {f"fnd/{k}": v for k, v in self.detector.threshold_metrics().items()}


class ClipObjective(Objective):
    """Loss of one batch for CLIP training, with optional false-negative detection."""

    def features(self, model, batch, device):
        out = model(image=batch["image"].to(device), text=batch["text"].to(device))
        return (out["image_features"], out["text_features"]), out["logit_scale"]

    def loss_from(self, feats, logit_scale, index, label, epoch, measure):
        return self(feats[0], feats[1], logit_scale, index, label, epoch, measure=measure)

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
        dev = img.device
        self.tables.check_indices(index)
        index = index.to(dev)
        img_all = distributed.gather_with_grad(img)
        txt_all = distributed.gather_with_grad(txt)
        label_all = distributed.gather(label)
        index_all = distributed.gather(index)
        pos = torch.arange(b, device=dev) + distributed.label_offset(b)
        anchors = {"img": img, "txt": txt}
        others = {"img": txt_all, "txt": img_all}

        # N_i: the other B-1 samples of the other modality, less copies of the anchor's sample
        duplicates = index_all.numel() - torch.unique(index_all).numel()
        copies: torch.Tensor | None = None
        num_neg: int | torch.Tensor = img_all.shape[0] - 1
        if duplicates:
            copies = index[:, None] == index_all.to(dev)[None, :]
            copies[torch.arange(b, device=dev), pos] = False
            num_neg = num_neg - copies.sum(1)

        det = self.detector
        masking, updating = det.masking(epoch), det.updating(epoch)
        logged, measure = measure, measure and masking
        truth: dict[str, torch.Tensor] | None = None
        if self.has_labels and (measure or (masking and det.needs_labels)):
            same = same_label(label.to(dev), label_all.to(dev), pos)
            if copies is not None:
                same &= ~copies
            truth = {t: same for t in ANCHORS}  # one label per sample: same truth both ways
        sims: dict[str, torch.Tensor] = {}
        if det.needs_similarities and (masking or updating):
            with torch.no_grad():
                sims = {t: anchors[t] @ others[t].T for t in ANCHORS}
        found = det.detect(
            DetectionInput(sims, pos, index, truth, copies, num_neg, epoch, measure=logged)
        )

        rows = {t: AnchorRows(anchors[t], others[t], pos, found.flags[t], copies) for t in ANCHORS}
        out = self.method.loss(rows, index, logit_scale, epoch)
        detection = None
        if measure:
            detection = sum(
                detection_counts(
                    found.flags[t], truth[t] if truth else torch.zeros_like(found.flags[t]), num_neg
                )
                for t in ANCHORS
            )
        return StepOutput(
            loss=out.loss,
            metrics={**out.metrics, **found.metrics},
            detection=detection,
            index=index,
            rows={**found.rows, **out.rows},
            duplicates=duplicates,
            stats=found.stats,
            masked=masking,
        )


class SimCLRObjective(Objective):
    """Loss of one batch for vision-only training (``mode: simclr``): two views per image.

    Rows: this rank's ``2b`` views (view 1 of its ``b`` images, then view 2); columns: the
    ``2B`` gathered views (view 1 of all ``B`` images, then view 2). A view's positive is its
    image's other view; its own column, and both views of any other copy of its image, are no
    negatives. ``N_i`` holds the ``2B - 2`` views of the other images. Detectors see one
    similarity row per view, ``K = 2`` rows per image (GloFND: one threshold per image over
    both rows).
    """

    anchor_types = ("view",)

    def features(self, model, batch, device):
        image = batch["image"].to(device)  # [b, 2, C, H, W]
        b = image.shape[0]
        views = image.transpose(0, 1).reshape(-1, *image.shape[2:])  # [2b, C, H, W]
        z = model(views)
        logit_scale = getattr(model, "module", model).logit_scale.exp()  # DDP wraps the model
        return (z[:b], z[b:]), logit_scale  # view 1, view 2 of each image

    def loss_from(self, feats, logit_scale, index, label, epoch, measure):
        return self(torch.cat(feats), logit_scale, index, label, epoch, measure)

    def __call__(
        self,
        z: torch.Tensor,
        logit_scale: torch.Tensor,
        index: torch.Tensor,
        label: torch.Tensor,
        epoch: int,
        measure: bool = True,
    ) -> StepOutput:
        """Loss of this rank's views.

        Args:
            z: ``[2b, d]`` normalised projections, view 1 of the ``b`` images then view 2.
            logit_scale: ``1/tau``; index, label: ``[b]``; epoch, measure: as ``ClipObjective``.
        """
        z = z.to(torch.promote_types(z.dtype, torch.float32))
        b = index.numel()
        dev = z.device
        self.tables.check_indices(index)
        index, label = index.to(dev), label.to(dev)
        others = torch.cat(
            [distributed.gather_with_grad(z[:b]), distributed.gather_with_grad(z[b:])]
        )
        index_all = distributed.gather(index)
        label_all = distributed.gather(label)
        B = index_all.numel()
        pos, self_col = view_columns(b, B, distributed.label_offset(b), dev)
        columns_index = torch.cat([index_all, index_all])
        rows = torch.arange(2 * b, device=dev)
        # own column, and every view of another copy of the image: no negative
        not_negative = index.repeat(2)[:, None] == columns_index[None, :]
        not_negative[rows, pos] = False
        duplicates = B - torch.unique(index_all).numel()
        num_neg: int | torch.Tensor = 2 * B - 2
        if duplicates:
            num_neg = (2 * B - 1) - not_negative[:b].sum(1)  # per image, the same for both views

        det = self.detector
        masking, updating = det.masking(epoch), det.updating(epoch)
        logged, measure = measure, measure and masking
        truth: dict[str, torch.Tensor] | None = None
        if self.has_labels and (measure or (masking and det.needs_labels)):
            same = same_label(label.repeat(2), torch.cat([label_all, label_all]), pos)
            truth = {"view": same & ~not_negative}
        sims: dict[str, torch.Tensor] = {}
        if det.needs_similarities and (masking or updating):
            with torch.no_grad():
                sims = {"view": z @ others.T}
        found = det.detect(
            DetectionInput(
                sims,
                pos,
                index,
                truth,
                not_negative,
                num_neg,
                epoch,
                2,
                columns_index,
                measure=logged,
            )
        )
        anchor_rows = {
            "view": AnchorRows(
                z, others, pos, found.flags["view"], not_negative, self_col, columns_index
            )
        }
        out = self.method.loss(anchor_rows, index, logit_scale, epoch)
        detection = None
        if measure and found.flags["view"] is not None:
            flags = found.flags["view"]
            per_row = num_neg if isinstance(num_neg, int) else num_neg.repeat(2)
            detection = detection_counts(
                flags, truth["view"] if truth else torch.zeros_like(flags), per_row
            )
        return StepOutput(
            loss=out.loss,
            metrics={**out.metrics, **found.metrics},
            detection=detection,
            index=index,
            rows={**found.rows, **out.rows},
            duplicates=duplicates,
            stats=found.stats,
            masked=masking,
        )


OBJECTIVES: dict[str, type[Objective]] = {"clip": ClipObjective, "simclr": SimCLRObjective}
