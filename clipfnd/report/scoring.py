"""What the report shows, computed: a checkpoint's model and per-sample tables, a split's
samples encoded, and the negatives its detector flags for a sample of anchors.

The flags come from the run's own detector (built as training builds it,
``clipfnd.fnd.build_detector``; its ``detect``, the call the training step makes), given the similarities of each anchor to every encoded sample of the
split, its dataset index (so GloFND reads that anchor's threshold from the checkpoint's
tables) and the labels. For a split that is not the run's training data, samples have no
rows in the tables: GloFND then uses the median learned threshold of the training set for
every anchor (the report says so), and IFND, whose pseudo-labels belong to training samples,
flags nothing.
"""

from __future__ import annotations

import logging
import math
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from tqdm.auto import tqdm

from clipfnd_eval.layouts import open_dataset
from clipfnd_eval.samples import Sample, collect, encode
from data_pipelines.progress import bar_disable

from ..checkpoints import LoadedCheckpoint, checkpoint_dir, final_path, load_checkpoint
from ..config import Config, from_dict
from ..errors import CheckpointError, UserError
from ..fnd import DetectionInput, Detector, build_detector, same_label
from ..fnd.per_anchor import PerAnchor, columns_of, flag_thresholds, measure
from ..registry import check_choices
from ..state import StateTables
from ..state.files import load_detector_state, load_tables, table_sources

log = logging.getLogger(__name__)


class ReportError(UserError):
    """A run, checkpoint or split the report cannot use."""


@dataclass
class AnchorFlags:
    """The flags of one anchor (``anchor_type``: img | txt | view) over the encoded split."""

    row: int
    anchor_type: str
    threshold: float | None  # GloFND's, when the run has one
    positive: float | None  # similarity to its own caption (img/txt anchors)
    flagged: list[tuple[int, float]]  # (row, similarity), most similar first: all of them
    nearest: list[tuple[int, float]]  # the most similar negatives that were not flagged
    same_label: int  # negatives with the anchor's label (-1: labels unknown)


@dataclass
class Scores:
    ckpt: LoadedCheckpoint
    cfg: Config
    data_path: str
    is_training: bool
    samples: list[Sample]
    classnames: list[str] | None
    detector: str
    epoch: int  # the epoch whose detector state the flags use
    notes: list[str] = field(default_factory=list)
    flags: dict[str, list[AnchorFlags]] = field(default_factory=dict)
    per_label: dict[int, list[int]] = field(default_factory=dict)  # label -> [tp, fp, fn]
    thresholds: dict[str, torch.Tensor] = field(default_factory=dict)  # type -> learned (all)
    confident: dict[str, tuple[list[Sample], list[Sample], torch.Tensor]] = field(
        default_factory=dict
    )  # type -> (highest, lowest, threshold per encoded row)
    clusters: list[dict[str, Any]] = field(default_factory=list)  # IFND
    features: dict[str, torch.Tensor] = field(default_factory=dict)  # type -> [N, d], by row
    skipped: int = 0  # samples of the split left out (no caption in a CLIP run, unreadable)
    seconds: dict[str, float] = field(default_factory=dict)
    mask_start_step: int | None = None  # the training step that first removed flagged negatives
    # GloFND: per-anchor calibration of the scored anchors against every encoded sample
    per_anchor: dict[str, PerAnchor] = field(default_factory=dict)
    per_anchor_rows: list[int] = field(default_factory=list)  # the anchors' encoded rows
    alpha: float | None = None


def find_checkpoint(run: str | Path, checkpoint: str | None) -> str:
    """``--checkpoint``: a step number of the run, a checkpoint folder, or (None) the newest."""
    if checkpoint is None:
        return str(run)
    if checkpoint.isdigit():
        path = final_path(run, int(checkpoint))
        if not path.is_dir():
            have = sorted(p.name for p in checkpoint_dir(run).glob("step_*"))
            raise ReportError(
                f"--checkpoint {checkpoint}: {path} does not exist (the run has "
                f"{', '.join(have) or 'no checkpoints'})"
            )
        return str(path)
    return checkpoint


def read_tables(ckpt: LoadedCheckpoint) -> StateTables:
    """The checkpoint's per-sample tables (safetensors, no pickle)."""
    try:
        num_rows, _ = table_sources(ckpt.path)
    except CheckpointError as e:
        raise ReportError(f"{e}, so its detector state is unknown") from e
    return StateTables(num_rows, "cpu")


def _same_path(a: str | None, b: str | None) -> bool:
    if not a or not b:
        return False
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def _detector(cfg: Config, tables: StateTables, has_labels: bool) -> Detector:
    """The run's detector, its tables added to ``tables``."""
    try:
        return build_detector(cfg, tables, has_labels)
    except UserError as e:
        raise ReportError(f"the run's detector cannot be rebuilt for this split: {e}") from e


def _fill_split_tables(det: Detector, train: StateTables, split: StateTables) -> None:
    """Tables for a split outside the training data: every row of each of the detector's
    tables holds what the detector gives a sample without a row of its own
    (``Detector.unseen_value``: GloFND, the median of the learned training rows; IFND, -1, no
    pseudo-label)."""
    for name in det.table_names():
        value = det.unseen_value(name, train)
        if value is not None:
            split[name].fill_(value)


def score(
    run: str | Path,
    *,
    checkpoint: str | None = None,
    data: str | None = None,
    max_samples: int = 10000,
    max_anchors: int = 256,
    batch_size: int = 256,
    seed: int = 0,
    device: str | None = None,
    progress: bool = True,
) -> Scores:
    """Everything the report shows except the plots (see the module docstring)."""
    import time

    t0 = time.perf_counter()
    try:
        ckpt = load_checkpoint(find_checkpoint(run, checkpoint))
    except FileNotFoundError as e:
        raise ReportError(str(e)) from e
    cfg = from_dict(ckpt.config)
    check_choices(cfg)  # a method or detector this version does not have: one line
    train_tables = read_tables(ckpt)  # before any encoding: a checkpoint without them fails fast
    data_path = data or cfg.data.train
    if not data_path:
        raise ReportError(f"{ckpt.path}: the run's config names no data.train; pass --data")
    if not Path(data_path).exists():
        raise ReportError(
            f"--data {data_path}: no such file or folder"
            + ("" if data else " (the run's data.train; pass --data where the data is now)")
        )
    is_training = _same_path(data_path, cfg.data.train)
    dataset = open_dataset(data_path, default_split="train")
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    raw, skipped = collect(dataset, max_samples, need_caption=cfg.mode == "clip")
    if len(raw) < 2:
        raise ReportError(f"--data {data_path}: fewer than 2 usable samples")
    feats, samples, bad = encode(ckpt, cfg.mode, raw, batch_size, dev, progress)
    t1 = time.perf_counter()

    labels = torch.tensor([s.label for s in samples])
    has_labels = bool((labels >= 0).any())
    train_detector = _detector(cfg, train_tables, has_labels)
    load_tables(train_tables, ckpt.path)
    notes: list[str] = []
    index = torch.tensor([s.index for s in samples])
    if is_training and (index < 0).any():
        raise ReportError(f"--data {data_path}: its samples carry no dataset index")
    if is_training and int(index.max()) >= train_tables.num_rows:
        raise ReportError(
            f"--data {data_path}: dataset index {int(index.max())} is outside the checkpoint's "
            f"{train_tables.num_rows} table rows; was the training data rebuilt?"
        )
    if is_training:
        det, tables = train_detector, train_tables
    else:
        index = torch.arange(len(samples))
        tables = StateTables(len(samples), "cpu")
        det = _detector(cfg, tables, has_labels)
        _fill_split_tables(det, train_tables, tables)
        notes.append(
            f"{data_path} is not the run's training data ({cfg.data.train}): its samples have "
            "no thresholds of their own. GloFND's flags use the median learned threshold for "
            "every anchor; IFND's pseudo-labels belong to training samples and flag nothing here."
        )
    load_detector_state(det, ckpt.path, ckpt.step or 0)
    epoch = int(ckpt.epoch or 0)
    if det.masked_from is None and det.name != "none":
        notes.append(
            f"At this checkpoint (step {det.steps}) the detector had not started removing "
            f"flagged negatives yet (fnd.start_mask={cfg.fnd.start_mask}); shown: what its "
            "state flags as it is."
        )
    scores = Scores(
        ckpt=ckpt,
        cfg=cfg,
        data_path=str(data_path),
        is_training=is_training,
        samples=samples,
        classnames=dataset.classnames,
        detector=det.name,
        epoch=epoch,
        notes=notes,
        skipped=skipped + bad,
        features=feats,
        mask_start_step=det.masked_from,
    )
    rng = random.Random(seed)
    anchors = sorted(rng.sample(range(len(samples)), min(max_anchors, len(samples))))
    flag_anchors(scores, det, tables, feats, index, labels, anchors, dev, progress)
    per_anchor(scores, det, tables, feats, index, anchors)
    t2 = time.perf_counter()
    confidence(scores, train_tables, index if is_training else None, getattr(det, "offsets", None))
    ifnd_clusters(scores, train_tables, index if is_training else None, cfg)
    scores.seconds = {"encode": t1 - t0, "flags": t2 - t1, "total": time.perf_counter() - t0}
    return scores


def per_anchor(
    scores: Scores,
    det: Detector,
    tables: StateTables,
    feats: dict[str, torch.Tensor],
    index: torch.Tensor,
    anchors: list[int],
) -> None:
    """GloFND: for the scored anchors, their own flagged share over every encoded sample, the
    distance of each threshold from its own quantile, and the same share under one global
    threshold flagging the same total (``clipfnd.fnd.per_anchor``)."""
    if det.name != "glofnd" or not anchors:
        return
    rows = torch.tensor(anchors)
    offsets = getattr(det, "offsets", {})
    scores.alpha = det.alpha
    scores.per_anchor_rows = list(anchors)
    for t, other in columns_of(scores.cfg.mode).items():
        thr = flag_thresholds(tables, t, index[rows], offsets)
        scores.per_anchor[t] = measure(feats[t][rows], feats[other], rows, thr, det.alpha)


@torch.no_grad()
def flag_anchors(
    scores: Scores,
    det: Detector,
    tables: StateTables,
    feats: dict[str, torch.Tensor],
    index: torch.Tensor,
    labels: torch.Tensor,
    anchors: list[int],
    device: torch.device,
    progress: bool,
    chunk: int = 128,
    nearest: int = 3,
) -> None:
    """Flags of every anchor against all encoded samples, by the run's detector; per-label
    true/false positives and misses when labels exist (``tables``: the detector's)."""
    cols = columns_of(scores.cfg.mode)
    n = len(scores.samples)
    dev_index, dev_labels = index.to(device), labels.to(device)
    has_labels = bool((labels >= 0).any())
    thresholds = {}
    offsets = getattr(det, "offsets", {})  # GloFND's offset: part of every threshold
    for t in cols:
        name = f"glofnd.lambda_{t}"
        if name in tables:
            thresholds[t] = tables.rows(name, index).float() + (offsets.get(t) or 0.0)
    out: dict[str, list[AnchorFlags]] = {t: [] for t in cols}
    per_label: dict[int, list[int]] = {}
    bar = tqdm(
        total=len(anchors), desc="report: flags", unit="anchor", disable=bar_disable(progress)
    )
    for start in range(0, len(anchors), chunk):
        rows = torch.tensor(anchors[start : start + chunk], device=device)
        sims = {t: feats[t][rows] @ feats[c].T for t, c in cols.items()}
        truth = None
        if has_labels:
            same = same_label(dev_labels[rows], dev_labels, rows)
            truth = {t: same for t in cols}
        found = det.detect(
            DetectionInput(
                sims,
                rows,
                dev_index[rows],
                truth,
                None,
                n - 1,
                scores.epoch,
                1,
                dev_index,
                inference=True,
            )
        )
        for t in cols:
            flags = found.flags.get(t)
            if flags is None:
                flags = torch.zeros_like(sims[t], dtype=torch.bool)
            for i, r in enumerate(rows.tolist()):
                f = flags[i]
                s = sims[t][i]
                order = torch.argsort(s[f], descending=True)
                flagged_rows = f.nonzero().squeeze(1)[order]
                not_flagged = s.clone()
                not_flagged[f] = -math.inf
                not_flagged[r] = -math.inf
                top = torch.topk(not_flagged, min(nearest, n - 1))
                same_n = -1
                if truth is not None:
                    tr = truth[t][i]
                    same_n = int(tr.sum())
                    lab = int(labels[r])
                    if lab >= 0:
                        c = per_label.setdefault(lab, [0, 0, 0])
                        c[0] += int((f & tr).sum())
                        c[1] += int((f & ~tr).sum())
                        c[2] += int((~f & tr).sum())
                out[t].append(
                    AnchorFlags(
                        row=r,
                        anchor_type=t,
                        threshold=float(thresholds[t][r]) if t in thresholds else None,
                        positive=float(s[r]) if scores.cfg.mode == "clip" else None,
                        flagged=[(int(j), float(s[j])) for j in flagged_rows.tolist()],
                        nearest=[
                            (int(j), float(v))
                            for v, j in zip(top.values.tolist(), top.indices.tolist())
                            if v > -math.inf
                        ],
                        same_label=same_n,
                    )
                )
        bar.update(len(rows))
    bar.close()
    scores.flags = out
    scores.per_label = dict(sorted(per_label.items()))


def confidence(
    scores: Scores,
    tables: StateTables,
    index: torch.Tensor | None,
    offsets: dict[str, float | None] | None = None,
    k: int = 6,
) -> None:
    """GloFND's learned thresholds (with the offset of their anchor type, where the run
    keeps one): all of them (the histogram) and, among the encoded training samples, the
    ``k`` highest and lowest."""
    for t in columns_of(scores.cfg.mode):
        name = f"glofnd.lambda_{t}"
        if name not in tables:
            continue
        shift = (offsets or {}).get(t) or 0.0
        seen = tables[f"glofnd.count_{t}"] > 0
        scores.thresholds[t] = tables[name][seen].float() + shift
        if index is None:
            continue
        lam = tables.rows(name, index).float() + shift
        learned = tables.rows(f"glofnd.count_{t}", index) > 0
        rows = learned.nonzero().squeeze(1)
        if rows.numel() == 0:
            continue
        order = rows[torch.argsort(lam[rows], descending=True)].tolist()
        scores.confident[t] = (
            [scores.samples[r] for r in order[:k]],
            [scores.samples[r] for r in order[::-1][:k]],
            lam,
        )


def ifnd_clusters(
    scores: Scores,
    tables: StateTables,
    index: torch.Tensor | None,
    cfg: Config,
    num: int = 4,
    members: int = 12,
) -> None:
    """IFND runs: the largest clusters of the coarsest granularity among the encoded training
    samples, with their members, whether each is accepted, and their labels' agreement."""
    name = "ifnd.cluster_0"
    if index is None or name not in tables:
        return
    cluster = tables.rows(name, index).long()
    accepted = tables.rows("ifnd.label_0", index) >= 0
    conf = tables.rows("ifnd.confidence_0", index).float()
    ids, counts = torch.unique(cluster[cluster >= 0], return_counts=True)
    for c in ids[torch.argsort(counts, descending=True)][:num].tolist():
        rows = (cluster == c).nonzero().squeeze(1)
        rows = rows[torch.argsort(conf[rows], descending=True)]
        labels = [scores.samples[r].label for r in rows.tolist()]
        known = [x for x in labels if x >= 0]
        top = max(set(known), key=known.count) if known else None
        scores.clusters.append(
            {
                "cluster": c,
                "granularity": cfg.fnd.num_clusters[0],
                "size": int(rows.numel()),
                "accepted": int(accepted[rows].sum()),
                "purity": known.count(top) / len(known) if known else None,
                "majority": top,
                "members": [
                    (scores.samples[r], bool(accepted[r]), float(conf[r]))
                    for r in rows[:members].tolist()
                ],
            }
        )
