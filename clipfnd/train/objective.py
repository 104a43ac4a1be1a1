"""One training step's loss: features -> pairs -> masks -> loss -> rows, for image-text (CLIP)
training (``ClipObjective``) and vision-only training over two views (``SimCLRObjective``).

The only place where the pieces meet. It never branches on a method's or a detector's name:
- features are gathered (``clipfnd.distributed``) into one ``BatchPairs``: each anchor type's
  rows against the gathered candidates, the positives, the columns that are no negatives,
  ``|N_i|``, the labels for scoring. The two modes differ only in building it (``pairs``);
  everything after it is one path (``score``);
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
from dataclasses import dataclass, field

import torch

from .. import distributed
from ..config import Config
from ..fnd import (
    ANCHOR_TYPES,
    DetectionInput,
    build_detector,
    detection_counts,
    detection_metrics,
    same_label,
)
from ..losses.unimodal import view_columns
from ..methods import METHODS, AnchorRows
from ..state import StateTables


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


@dataclass
class BatchPairs:
    """One batch's pairs, as the detector, the method and the counts all see them.

    Shape (``n = K b`` rows: ``K = rows_per_sample`` per sample of this rank's ``b``; ``M``
    gathered columns): anchors, others ``{anchor type: [n, d] / [M, d]}`` (with gradient);
    pos ``[n]`` each row's positive column; not_negative ``[n, M]`` the columns that are
    neither its positive nor a negative (copies of its own sample; unimodal, its own column)
    or None; num_neg ``|N_i|``, one number or ``[b]``; index ``[b]`` dataset indices;
    label_rows ``[n]`` and label_cols ``[M]`` the labels for scoring (-1: none); self_col
    ``[n]`` and columns_index ``[M]`` each row's own column and each column's dataset index
    (unimodal, else None); duplicates: samples of the global batch repeated in it.
    """

    anchors: dict[str, torch.Tensor]
    others: dict[str, torch.Tensor]
    pos: torch.Tensor
    not_negative: torch.Tensor | None
    num_neg: int | torch.Tensor
    index: torch.Tensor
    label_rows: torch.Tensor
    label_cols: torch.Tensor
    duplicates: int = 0
    rows_per_sample: int = 1
    self_col: torch.Tensor | None = None
    columns_index: torch.Tensor | None = None
    column_ids: torch.Tensor | None = None  # [M] every column's dataset index (both modes)
    # what the detector reads instead of (anchors, others), detached ({anchor type: ([n, d],
    # [M, d])}; None: the features the loss sees): CLIP's clean view (``fnd.view=clean``)
    detect: dict[str, tuple[torch.Tensor, torch.Tensor]] | None = None

    def truth(self) -> dict[str, torch.Tensor]:
        """Per anchor type, the negatives that share the anchor's label (one label per
        sample: the same truth for every anchor type)."""
        same = same_label(self.label_rows, self.label_cols, self.pos)
        if self.not_negative is not None:
            same &= ~self.not_negative
        return {t: same for t in self.anchors}

    def negatives_per_row(self) -> int | torch.Tensor:
        """``|N_i|`` of every row (``num_neg`` is per sample)."""
        n = self.num_neg
        return n if isinstance(n, int) else n.repeat(self.rows_per_sample)


class Objective(ABC):
    """What both modes share: the method, the detector, scoring a batch's pairs, and writing
    a step's rows.

    Args:
        cfg: the run config (``loss`` picks the method, ``fnd`` the detector).
        tables: per-sample tables of the training set (the method's and the detector's).
        has_labels: the data carries labels (enables the oracle and detection quality).
        normalize: ``uint8`` images -> the model's float input, applied on the device
            (``data_pipelines.pixels``: the loader hands over ``uint8``); None: the loader's
            images are the model's input as they are.
    """

    anchor_types: tuple[str, ...] = ANCHOR_TYPES["clip"]

    def __init__(
        self,
        cfg: Config,
        tables: StateTables,
        has_labels: bool,
        normalize: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ):
        self.tables = tables
        self.has_labels = has_labels
        self.normalize = normalize
        self.detector = build_detector(cfg, tables, has_labels, self.anchor_types)
        self.method = METHODS[cfg.loss.name].from_config(cfg, tables, self.anchor_types)

    def images(self, batch: dict, device: torch.device) -> torch.Tensor:
        """The batch's images on ``device``, normalised there if the loader sent ``uint8``."""
        image = batch["image"].to(device, non_blocking=True)
        if image.dtype != torch.uint8:
            return image
        if self.normalize is None:
            raise TypeError("uint8 images from the loader, but no normalize was given")
        return self.normalize(image)

    @abstractmethod
    def features(
        self, model: torch.nn.Module, batch: dict, device: torch.device, detect: bool = True
    ) -> tuple[tuple[torch.Tensor, ...], torch.Tensor]:
        """``(per-sample feature tensors, each [b, d]; logit_scale)`` of one batch; with
        ``detect``, also what only the detector reads (CLIP's clean view, no gradient), last."""

    @abstractmethod
    def pairs(
        self, feats: tuple[torch.Tensor, ...], index: torch.Tensor, label: torch.Tensor
    ) -> BatchPairs:
        """The pairs of this rank's samples (``features``' output) against the global batch
        (collectives inside: every rank calls it)."""

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
        return self.score(self.pairs(feats, index, label), logit_scale, epoch, measure)

    def __call__(self, *args, epoch: int | None = None, measure: bool = True) -> StepOutput:
        """This rank's loss from normalised features (for callers that hold features, not a
        batch): ``objective(image_features, text_features, logit_scale, index, label,
        epoch)`` in CLIP training, ``objective(z, logit_scale, index, label, epoch)`` with two
        views (``z`` ``[2b, d]``: view 1 of the ``b`` images, then view 2); ``measure``: also
        count detection quality."""
        if epoch is None:
            *args, epoch = args
        *feats, logit_scale, index, label = args
        return self.loss_from(tuple(feats), logit_scale, index, label, epoch, measure)

    def detecting(self, epoch: int) -> bool:
        """Whether the detector reads this step's pairs (it masks or learns): the forward of
        what only it reads (CLIP's clean view) is skipped otherwise."""
        return self.detector.masking(epoch) or self.detector.updating(epoch)

    def batch_loss(
        self, model: torch.nn.Module, batch: dict, device: torch.device, epoch: int, measure: bool
    ) -> StepOutput:
        """Forward ``batch`` through ``model`` and return this rank's loss and rows."""
        feats, logit_scale = self.features(model, batch, device, self.detecting(epoch))
        return self.loss_from(
            feats, logit_scale, batch["index"].to(device), batch["label"].to(device), epoch, measure
        )

    def score(
        self, p: BatchPairs, logit_scale: torch.Tensor, epoch: int, measure: bool
    ) -> StepOutput:
        """The loss of ``p``: the detector's flags (from its state before this step's update),
        the method's loss without the flagged negatives, the rows both want written, and
        (``measure``: a logged step) the detection counts."""
        det = self.detector
        masking, updating = det.masking(epoch), det.updating(epoch)
        logged, measure = measure, measure and masking
        truth = None
        if self.has_labels and (measure or (masking and det.needs_labels)):
            truth = p.truth()
        view = p.detect or {t: (p.anchors[t].detach(), p.others[t].detach()) for t in p.anchors}
        sims: dict[str, torch.Tensor] = {}
        if det.needs_similarities and (masking or updating):
            with torch.no_grad():
                sims = {t: a @ o.T for t, (a, o) in view.items()}
        found = det.detect(
            DetectionInput(
                sims,
                p.pos,
                p.index,
                truth,
                p.not_negative,
                p.num_neg,
                epoch,
                p.rows_per_sample,
                p.columns_index,
                measure=logged,
                features=view if det.needs_features and (masking or updating) else None,
                column_ids=p.column_ids,
            )
        )
        rows = {
            t: AnchorRows(
                p.anchors[t],
                p.others[t],
                p.pos,
                found.flags[t],
                p.not_negative,
                p.self_col,
                p.columns_index,
            )
            for t in p.anchors
        }
        out = self.method.loss(rows, p.index, logit_scale, epoch)
        detection = None
        flagged = {t: f for t, f in found.flags.items() if f is not None}
        if measure and flagged:
            per_row = p.negatives_per_row()
            detection = sum(
                detection_counts(f, truth[t] if truth else torch.zeros_like(f), per_row)
                for t, f in flagged.items()
            )
        return StepOutput(
            loss=out.loss,
            metrics={**out.metrics, **found.metrics},
            detection=detection,
            index=p.index,
            rows={**found.rows, **out.rows},
            duplicates=p.duplicates,
            stats=found.stats,
            masked=masking,
        )

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

    def detector_metrics(self) -> dict[str, float]:
        """What the detector says of its state (GloFND's thresholds, IFND's accepted share)."""
        return {f"fnd/{k}": v for k, v in self.detector.state_metrics().items()}


class ClipObjective(Objective):
    """Loss of one batch for CLIP training, with optional false-negative detection."""

    def features(self, model, batch, device, detect=True):
        """Images ``[b, C, H, W]``, or ``[b, 2, C, H, W]``: the training view, then the clean
        view (``fnd.view=clean``), whose features (a forward without gradient, in the model's
        mode) come third."""
        image = self.images(batch, device)
        clean = None
        if image.dim() == 5:
            image, clean = image[:, 0], image[:, 1]
        out = model(image=image, text=batch["text"].to(device))
        feats = (out["image_features"], out["text_features"])
        if clean is not None and detect:
            with torch.no_grad():
                feats += (model(image=clean)["image_features"],)
        # 0-d (a 1-element vector under FSDP, gathered in the forward)
        return feats, out["logit_scale"].reshape(())

    def pairs(self, feats, index, label):
        """Image anchors against the gathered texts and text anchors against the gathered
        images; ``N_i``: the other ``B - 1`` samples, less copies of the anchor's sample. A
        third feature (the clean view's) is what the detector reads in place of the images."""
        dtype = torch.promote_types(feats[0].dtype, torch.float32)  # bf16/fp16 -> fp32
        img, txt = feats[0].to(dtype), feats[1].to(dtype)
        b, dev = img.shape[0], img.device
        self.tables.check_indices(index)
        index = index.to(dev)
        img_all = distributed.gather_with_grad(img)
        txt_all = distributed.gather_with_grad(txt)
        label_all = distributed.gather(label)
        index_all = distributed.gather(index)
        pos = torch.arange(b, device=dev) + distributed.label_offset(b)
        duplicates = index_all.numel() - torch.unique(index_all).numel()
        copies: torch.Tensor | None = None
        num_neg: int | torch.Tensor = img_all.shape[0] - 1
        if duplicates:
            copies = index[:, None] == index_all.to(dev)[None, :]
            copies[torch.arange(b, device=dev), pos] = False
            num_neg = num_neg - copies.sum(1)
        detect = None
        if len(feats) > 2:
            clean = feats[2].detach().to(dtype)
            detect = {
                "img": (clean, txt_all.detach()),
                "txt": (txt.detach(), distributed.gather(clean)),
            }
        return BatchPairs(
            {"img": img, "txt": txt},
            {"img": txt_all, "txt": img_all},
            pos,
            copies,
            num_neg,
            index,
            label.to(dev),
            label_all.to(dev),
            duplicates,
            column_ids=index_all.to(dev),
            detect=detect,
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

    anchor_types = ANCHOR_TYPES["simclr"]

    def features(self, model, batch, device, detect=True):
        image = self.images(batch, device)  # [b, 2, C, H, W]
        b = image.shape[0]
        views = image.transpose(0, 1).reshape(-1, *image.shape[2:])  # [2b, C, H, W]
        z = model(views)
        # DDP wraps the model; FSDP shards the parameter (``distributed.temperature``)
        logit_scale = distributed.temperature(getattr(model, "module", model).logit_scale).exp()
        return (z[:b], z[b:]), logit_scale  # view 1, view 2 of each image

    def pairs(self, feats, index, label):
        z = torch.cat(feats)
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
        return BatchPairs(
            {"view": z},
            {"view": others},
            pos,
            not_negative,
            num_neg,
            index,
            label.repeat(2),
            torch.cat([label_all, label_all]),
            duplicates,
            rows_per_sample=2,
            self_col=self_col,
            columns_index=columns_index,
            column_ids=columns_index,
        )


OBJECTIVES: dict[str, type[Objective]] = {"clip": ClipObjective, "simclr": SimCLRObjective}
