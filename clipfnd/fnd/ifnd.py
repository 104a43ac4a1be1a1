"""IFND: incremental false-negative detection by clustering the whole training set.

Chen et al., "Incremental False Negative Detection for Self-Supervised Contrastive Learning"
(ICLR 2022). docs/methods.md, "IFND". Vision-only mode.

At the start of every ``cluster_every``-th epoch from ``start_update`` on, the whole training
set is embedded (un-augmented, normalised projections, every process a slice, gathered) and
clustered by k-means at each granularity of ``num_clusters`` (``clustering.py``). A sample's
confidence is its cosine similarity to its own centroid. At the start of every epoch ``e``
the top ``r(e)`` share of samples by confidence is accepted, per granularity, ``r`` rising
linearly from ``accept_start`` at ``start_update`` to 1 at the last epoch; an accepted
sample's pseudo-label is its cluster, the others have none. From ``start_mask`` on, negatives
``j`` of anchor ``i`` are flagged when both are accepted and share a cluster at any (or all,
``match``) granularities.

State: for each granularity ``g``, the tables ``ifnd.cluster_g``, ``ifnd.confidence_g`` and
``ifnd.label_g`` (the pseudo-label, -1: none). They are written at epoch starts only, with the
same values on every process (the clustering runs on process 0 from the gathered features and
is broadcast), and are saved and restored with the other per-sample tables, so a resume
inside an epoch finds the pseudo-labels that epoch used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .. import distributed
from ..state import StateTables
from .base import Detection, DetectionInput, Detector, EmbedFn, EpochStart
from .clustering import accept, acceptance_ratio, cluster_hierarchy, flags_from_labels

if TYPE_CHECKING:
    from ..config import FNDConfig


class IFND(Detector):
    """Clustering-based detection (see the module docstring).

    Args:
        tables: the per-sample tables (three per granularity are added).
        anchor_types: ``("view",)``.
        num_clusters: the hierarchy of cluster counts.
        cluster_every: epochs between clusterings (the first at ``start_update``).
        last_epoch: the run's last epoch (acceptance reaches 1.0 there).
        accept_start: the accepted share at ``start_update``.
        match: ``any`` | ``all`` granularities must agree.
        seed, kmeans_iters, kmeans_backend: k-means (``auto``: faiss when installed).
        progress: show a progress bar while clustering.
    """

    name = "ifnd"
    modes = ("simclr",)

    def __init__(
        self,
        tables: StateTables,
        anchor_types: tuple[str, ...],
        *,
        num_clusters: list[int],
        cluster_every: int,
        last_epoch: int,
        accept_start: float,
        match: str,
        seed: int,
        kmeans_iters: int,
        kmeans_backend: str,
        start_update: int,
        start_mask: int,
        progress: bool = True,
    ):
        super().__init__(anchor_types, start_update=start_update, start_mask=start_mask)
        if cluster_every < 1:
            raise ValueError(f"cluster_every must be >= 1, got {cluster_every}")
        for k in num_clusters:
            if k > tables.num_rows:
                raise ValueError(
                    f"fnd.num_clusters holds {k} clusters, more than the {tables.num_rows} "
                    "training samples"
                )
        self.tables = tables
        self.num_clusters = list(num_clusters)
        self.cluster_every, self.last_epoch = cluster_every, last_epoch
        self.accept_start, self.match = accept_start, match
        self.seed, self.iters, self.backend = seed, kmeans_iters, kmeans_backend
        self.progress = progress
        for g in range(len(self.num_clusters)):
            tables.add(f"ifnd.cluster_{g}", -1.0)
            tables.add(f"ifnd.confidence_{g}", float("-inf"))
            tables.add(f"ifnd.label_{g}", -1.0)

    @classmethod
    def from_config(
        cls, fnd: FNDConfig, tables: StateTables, anchor_types: tuple[str, ...], **run
    ) -> IFND:
        return cls(
            tables,
            anchor_types,
            num_clusters=fnd.num_clusters,
            cluster_every=fnd.cluster_every,
            last_epoch=run.get("last_epoch", 0),
            accept_start=fnd.accept_start,
            match=fnd.match,
            seed=run.get("seed", 0),
            kmeans_iters=fnd.kmeans_iters,
            kmeans_backend=fnd.kmeans_backend,
            start_update=fnd.start_update,
            start_mask=fnd.start_mask,
            progress=run.get("progress", True),
        )

    def clusters_at(self, epoch: int) -> bool:
        """Whether the training set is clustered at the start of ``epoch``."""
        return epoch >= self.start_update and (epoch - self.start_update) % self.cluster_every == 0

    def accepted_ratio(self, epoch: int) -> float:
        return acceptance_ratio(epoch, self.start_update, self.last_epoch, self.accept_start)

    def _column(self, name: str, g: int) -> torch.Tensor:
        return self.tables[f"ifnd.{name}_{g}"]

    def table_names(self) -> tuple[str, ...]:
        return tuple(
            f"ifnd.{kind}_{g}"
            for g in range(len(self.num_clusters))
            for kind in ("cluster", "confidence", "label")
        )

    def unseen_value(self, name: str, train: StateTables) -> float | None:
        """-1: a sample outside the training data has no cluster and no pseudo-label."""
        return -1.0

    @torch.no_grad()
    def start_epoch(self, epoch: int, embed: EmbedFn, fresh: bool) -> EpochStart:
        """Cluster the training set (on the epochs ``clusters_at`` names; rank 0 clusters and
        broadcasts, so every process gets the same labels), then accept the most confident
        share of this epoch: columns ``ifnd.cluster_g`` / ``ifnd.confidence_g`` (when it
        clustered; samples that could not be read: -1 / -inf) and ``ifnd.label_g`` (-1: not
        accepted) for the loop to write."""
        if not fresh or epoch < self.start_update:
            return EpochStart()
        G, dev = len(self.num_clusters), self.tables.device
        columns: dict[str, torch.Tensor] = {}
        if self.clusters_at(epoch):
            index, feats = embed()
            G_n = (G, index.numel())
            assign = torch.empty(G_n, dtype=torch.long, device=feats.device)
            confidence = torch.empty(G_n, dtype=torch.float32, device=feats.device)
            if distributed.rank() == 0:  # one clustering, the same labels on every process
                a, c = cluster_hierarchy(
                    feats.float(),
                    self.num_clusters,
                    seed=self.seed + 1000 * epoch,
                    iters=self.iters,
                    backend=self.backend,
                    progress=self.progress,
                )
                assign.copy_(a)
                confidence.copy_(c)
            distributed.broadcast(assign)
            distributed.broadcast(confidence)
            idx = index.to(dev)
            cluster = torch.full((G, self.tables.num_rows), -1.0, device=dev)
            conf = torch.full((G, self.tables.num_rows), float("-inf"), device=dev)
            cluster[:, idx] = assign.to(dev).float()
            conf[:, idx] = confidence.to(dev)
            for g in range(G):
                columns[f"ifnd.cluster_{g}"] = cluster[g]
                columns[f"ifnd.confidence_{g}"] = conf[g]
        else:
            cluster = torch.stack([self._column("cluster", g) for g in range(G)])
            conf = torch.stack([self._column("confidence", g) for g in range(G)])
        ratio = self.accepted_ratio(epoch)
        accepted = accept(conf, ratio, cluster[0] >= 0)
        for g in range(G):
            columns[f"ifnd.label_{g}"] = torch.where(accepted[g], cluster[g], -1.0)
        return EpochStart(
            {"fnd/accepted_share": ratio, "fnd/accepted": float(accepted[0].sum())}, columns
        )

    def labels(self, index: torch.Tensor, device: torch.device) -> torch.Tensor:
        """``[n, G]`` pseudo-labels of dataset indices ``index`` (-1: none)."""
        cols = [
            self.tables.rows(f"ifnd.label_{g}", index, device)
            for g in range(len(self.num_clusters))
        ]
        return torch.stack(cols, dim=1).long()

    @torch.no_grad()
    def detect(self, inp: DetectionInput) -> Detection:
        found = Detection({t: None for t in self.anchor_types})
        if not (inp.inference or self.masking(inp.epoch)):
            return found
        if inp.columns_index is None:
            raise ValueError("IFND needs the dataset index of every column")
        dev = inp.pos.device
        anchors = self.labels(inp.index, dev).repeat(inp.rows_per_sample, 1)
        columns = self.labels(inp.columns_index, dev)
        flags = flags_from_labels(anchors, columns, self.match)
        flags[torch.arange(flags.shape[0], device=dev), inp.pos] = False
        if inp.not_negative is not None:
            flags &= ~inp.not_negative
        for t in self.anchor_types:
            found.flags[t] = flags
        return found

    def state_metrics(self) -> dict[str, float]:
        label = self._column("label", 0)
        return {"accepted_share": float((label >= 0).float().mean())}
