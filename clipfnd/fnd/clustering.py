"""The pure-tensor core of IFND: hierarchical k-means, confidence, incremental acceptance, flags.

Chen et al., "Incremental False Negative Detection for Self-Supervised Contrastive Learning"
(ICLR 2022, arXiv 2106.03719).

Every ``cluster_every`` epochs the caller embeds the whole training set (L2-normalised
features ``x`` [N, d]) and hands them here:

1. ``cluster_hierarchy`` runs spherical k-means once per granularity in ``num_clusters``
   (e.g. ``[10, 25, 50]``) and returns each sample's cluster and its confidence, the cosine
   similarity to its own (L2-normalised) centroid.
2. ``acceptance_ratio`` gives the share ``r(e)`` of samples accepted at epoch ``e``: 0 before
   ``start_epoch``, ``r_start`` at it, rising linearly to 1.0 at the last epoch.
3. ``accept`` keeps, per granularity, the top ``r(e)`` share by confidence; ``pseudo_labels``
   gives the others the label -1.
4. ``flags_from_labels`` flags the negatives ``j`` of anchor ``i`` that share a cluster with it
   (both accepted) at ``any`` / ``all`` granularities.

Everything here is deterministic: the same input gives bit-identical output on every call.
Random draws (the k-means++ initialisation) come from a CPU ``torch.Generator``, so they do
not depend on the device; the arithmetic runs on the input's device in float32, and every
result is returned on the input's device.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor
from tqdm.auto import tqdm

from data_pipelines.progress import bar_disable

__all__ = [
    "BACKENDS",
    "MATCHES",
    "accept",
    "acceptance_ratio",
    "cluster_hierarchy",
    "flags_from_labels",
    "kmeans",
    "pseudo_labels",
]

BACKENDS = ("auto", "torch", "faiss")
MATCHES = ("any", "all")

# rows per chunk in the [chunk, k] similarity and one-hot products (bounds memory for large N)
_CHUNK = 65536


def _import_faiss(backend: str):
    """The faiss module, or None where the torch path is to run.

    ``backend="faiss"`` without faiss installed raises ImportError; ``"auto"`` falls back.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return None
    try:
        import faiss
    except ImportError as e:
        if backend == "faiss":
            raise ImportError(
                "kmeans backend='faiss' needs faiss, which is not installed: "
                "pip install faiss-cpu (or pip install 'clipfnd[faiss]'), "
                "or use backend='torch' / 'auto'"
            ) from e
        return None
    return faiss


def _assign(x: Tensor, centroids: Tensor) -> Tensor:
    """Nearest centroid by cosine: x [N, d], centroids [k, d] (both unit rows) -> [N] long.

    Ties go to the lower cluster index (``argmax`` returns the first maximum).
    """
    out = torch.empty(x.shape[0], dtype=torch.long, device=x.device)
    for s in range(0, x.shape[0], _CHUNK):
        out[s : s + _CHUNK] = (x[s : s + _CHUNK] @ centroids.T).argmax(dim=1)
    return out


def _own_similarity(x: Tensor, centroids: Tensor, assign: Tensor) -> Tensor:
    """cos(x_n, centroid of its cluster): x [N, d], centroids [k, d], assign [N] -> [N]."""
    out = torch.empty(x.shape[0], dtype=x.dtype, device=x.device)
    for s in range(0, x.shape[0], _CHUNK):
        out[s : s + _CHUNK] = (x[s : s + _CHUNK] * centroids[assign[s : s + _CHUNK]]).sum(dim=1)
    return out


def _update(
    x: Tensor, assign: Tensor, k: int, old: Tensor | None = None, *, reseed: bool = True
) -> Tensor:
    """Normalised member means: x [N, d], assign [N] -> centroids [k, d] (unit rows).

    Sums are one-hot matrix products in a fixed chunk order (deterministic on every device,
    unlike ``index_add_`` on CUDA). An empty cluster, with ``reseed``, takes the point
    farthest from its own centroid (the farthest for the first empty cluster, the next
    farthest for the second, ...; ties by lower index), so the next assignment can fill it;
    without ``reseed`` it keeps its ``old`` centroid.
    """
    sums = torch.zeros(k, x.shape[1], dtype=x.dtype, device=x.device)
    for s in range(0, x.shape[0], _CHUNK):
        onehot = F.one_hot(assign[s : s + _CHUNK], k).to(x.dtype)
        sums += onehot.T @ x[s : s + _CHUNK]
    counts = torch.bincount(assign, minlength=k)
    empty = counts == 0
    centroids = F.normalize(sums, dim=1)
    if not bool(empty.any()):
        return centroids
    empties = empty.nonzero().flatten()
    if reseed:
        dist = 1.0 - _own_similarity(x, centroids, assign)
        far = torch.sort(-dist, stable=True).indices[: empties.numel()]
        # k <= N, so there are at least as many points as empty clusters
        centroids[empties] = x[far]
    elif old is not None:
        centroids[empties] = old[empties]
    return centroids


def _kmeanspp(x: Tensor, k: int, generator: torch.Generator) -> Tensor:
    """k-means++ seeds on the sphere: x [N, d] unit rows -> centroids [k, d].

    Distances (``2 - 2 cos``, the squared chord) run on ``x``'s device; the draws come from the
    CPU ``generator`` over float64 weights on the CPU. Where every point already sits on a
    seed (fewer distinct points than k), the next seed is drawn uniformly.
    """
    n = x.shape[0]
    first = int(torch.randint(n, (1,), generator=generator))
    idx = [first]
    d2 = (2.0 - 2.0 * (x @ x[first])).clamp_min(0.0)
    for _ in range(1, k):
        w = d2.double().cpu()
        cum = torch.cumsum(w, dim=0)
        total = float(cum[-1])
        u = torch.rand(1, generator=generator, dtype=torch.float64)
        if total > 0.0:
            nxt = int(torch.searchsorted(cum, u * total, right=True).clamp_max(n - 1))
        else:
            nxt = int((u * n).floor().clamp_max(n - 1))
        idx.append(nxt)
        d2 = torch.minimum(d2, (2.0 - 2.0 * (x @ x[nxt])).clamp_min(0.0))
    return x[torch.tensor(idx, device=x.device)].clone()


def _kmeans_faiss(
    faiss, x: Tensor, k: int, *, seed: int, iters: int, progress: bool
) -> tuple[Tensor, Tensor]:
    """faiss spherical k-means on the CPU; results moved back to ``x``'s device.

    The returned centroids are recomputed as the normalised means of the returned
    assignment's members (faiss's own centroid for a cluster left empty), so they mean the
    same as the torch path's.
    """
    xn = x.detach().float().cpu().contiguous().numpy()
    km = faiss.Kmeans(xn.shape[1], k, niter=iters, seed=seed, spherical=True, verbose=progress)
    km.train(xn)
    _, index = km.index.search(xn, 1)
    assign = torch.from_numpy(index.reshape(-1)).long()
    faiss_centroids = F.normalize(torch.from_numpy(km.centroids).float(), dim=1)
    centroids = _update(x.detach().float().cpu(), assign, k, faiss_centroids, reseed=False)
    return centroids.to(x.device), assign.to(x.device)


def kmeans(
    x: Tensor,
    k: int,
    *,
    seed: int,
    iters: int = 50,
    backend: str = "auto",
    progress: bool = False,
    desc: str = "",
) -> tuple[Tensor, Tensor]:
    """Spherical k-means (cosine assignment, centroids = normalised mean of members).

    Args:
        x: [N, d] features; rows are L2-normalised here again (in float32), so any scale works.
        k: number of clusters, 1 <= k <= N (ValueError otherwise).
        seed: seeds the k-means++ initialisation (a CPU ``torch.Generator``) or faiss.
        iters: at most this many Lloyd iterations; stops early once assignments stop changing.
        backend: ``"auto"`` (faiss where it imports, torch otherwise), ``"torch"`` or
            ``"faiss"`` (ImportError naming ``pip install faiss-cpu`` where faiss is absent).
        progress: a tqdm bar over iterations (torch path) / faiss's verbose output.
        desc: the bar's description (default ``"k-means k=<k>"``).

    Returns:
        centroids [k, d] float32, unit rows, on ``x``'s device; for a non-empty cluster the
        normalised mean of its members under ``assign``.
        assign [N] long in ``[0, k)``, on ``x``'s device.

    An empty cluster is re-seeded with the point farthest from its centroid. A cluster can
    still end empty (e.g. when there are fewer distinct points than k): its centroid is then
    a data point (never NaN) and no sample carries its id.

    The torch path is bit-identical from call to call on one device (fixed chunk order, no
    atomics); the random draws are the same on every device.
    """
    if x.dim() != 2:
        raise ValueError(f"kmeans expects x of shape [N, d], got {tuple(x.shape)}")
    n = x.shape[0]
    if k < 1 or k > n:
        raise ValueError(f"kmeans needs 1 <= k <= N, got k={k} for N={n} samples")
    if iters < 1:
        raise ValueError(f"kmeans needs iters >= 1, got {iters}")
    faiss = _import_faiss(backend)
    if faiss is not None:
        return _kmeans_faiss(faiss, x, k, seed=seed, iters=iters, progress=progress)

    x = F.normalize(x.detach().float(), dim=1)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    centroids = _kmeanspp(x, k, generator)
    assign = _assign(x, centroids)
    converged = False
    bar = tqdm(
        range(iters), desc=desc or f"k-means k={k}", disable=bar_disable(progress), leave=False
    )
    for _ in bar:
        centroids = _update(x, assign, k)
        new = _assign(x, centroids)
        if torch.equal(new, assign):
            converged = True
            break
        assign = new
    bar.close()
    if not converged:
        centroids = _update(x, assign, k, centroids, reseed=False)
    return centroids, assign


def cluster_hierarchy(
    x: Tensor,
    num_clusters: list[int],
    *,
    seed: int,
    iters: int = 50,
    backend: str = "auto",
    progress: bool = False,
) -> tuple[Tensor, Tensor]:
    """k-means at each granularity, and each sample's confidence.

    Args:
        x: [N, d] features (L2-normalised; normalised again here).
        num_clusters: the G granularities, e.g. ``[10, 25, 50]``; each 1 <= k <= N.
        seed: granularity g runs ``kmeans(..., seed=seed + g)``.
        iters, backend: passed to ``kmeans``.
        progress: a tqdm bar over granularities (``"IFND k-means k=<k>"``).

    Returns:
        assign [G, N] long, the cluster of sample n at granularity g.
        confidence [G, N] float32, ``cos(x_n, normalised centroid of its cluster)``.
        Both on ``x``'s device.
    """
    if len(num_clusters) == 0:
        raise ValueError("cluster_hierarchy needs at least one granularity in num_clusters")
    xn = F.normalize(x.detach().float(), dim=1)
    assigns, confidences = [], []
    bar = tqdm(num_clusters, disable=bar_disable(progress), leave=False)
    for g, k in enumerate(bar):
        bar.set_description(f"IFND k-means k={k}")
        centroids, assign = kmeans(xn, int(k), seed=seed + g, iters=iters, backend=backend)
        assigns.append(assign)
        confidences.append(_own_similarity(xn, centroids, assign))
    bar.close()
    return torch.stack(assigns), torch.stack(confidences)


def acceptance_ratio(epoch: int, start_epoch: int, last_epoch: int, r_start: float = 0.0) -> float:
    """The share r(e) of samples accepted at ``epoch``.

    0 before ``start_epoch``; ``r_start`` at it; linear up to 1.0 at ``last_epoch`` (usually
    ``epochs - 1``); 1.0 after. Where ``last_epoch <= start_epoch``, 1.0 from ``start_epoch`` on.
    """
    if not 0.0 <= r_start <= 1.0:
        raise ValueError(f"r_start must be in [0, 1], got {r_start}")
    if epoch < start_epoch:
        return 0.0
    if last_epoch <= start_epoch or epoch >= last_epoch:
        return 1.0
    return r_start + (1.0 - r_start) * (epoch - start_epoch) / (last_epoch - start_epoch)


def accept(confidence: Tensor, ratio: float, valid: Tensor | None = None) -> Tensor:
    """Per granularity, the ``round(ratio * n_valid)`` most confident valid samples.

    Args:
        confidence: [G, N] float.
        ratio: in [0, 1]; 0 accepts none, 1 every valid sample.
        valid: [N] bool, the samples that may be accepted (e.g. those embedded this round);
            None means all.

    Returns:
        [G, N] bool on ``confidence``'s device. Ties go to the lower index (a stable sort on
        ``-confidence``); a NaN confidence ranks last.
    """
    if not 0.0 <= ratio <= 1.0:
        raise ValueError(f"ratio must be in [0, 1], got {ratio}")
    if confidence.dim() != 2:
        raise ValueError(f"confidence must be [G, N], got {tuple(confidence.shape)}")
    g, n = confidence.shape
    if valid is None:
        cols = torch.arange(n, device=confidence.device)
    else:
        valid = valid.to(device=confidence.device, dtype=torch.bool)
        if valid.shape != (n,):
            raise ValueError(f"valid must be [N]=[{n}], got {tuple(valid.shape)}")
        cols = valid.nonzero().flatten()
    out = torch.zeros(g, n, dtype=torch.bool, device=confidence.device)
    m = int(round(ratio * cols.numel()))
    if m == 0:
        return out
    conf = confidence[:, cols].double().nan_to_num(nan=float("-inf"))
    top = torch.sort(-conf, dim=1, stable=True).indices[:, :m]
    out.scatter_(1, cols[top], True)
    return out


def pseudo_labels(assign: Tensor, accepted: Tensor) -> Tensor:
    """Cluster ids where accepted, -1 elsewhere: assign [G, N] long, accepted [G, N] bool ->
    [G, N] long."""
    if assign.shape != accepted.shape:
        raise ValueError(
            f"assign {tuple(assign.shape)} and accepted {tuple(accepted.shape)} differ in shape"
        )
    minus = torch.full_like(assign, -1, dtype=torch.long)
    return torch.where(accepted.to(assign.device, torch.bool), assign.long(), minus)


def flags_from_labels(anchor_labels: Tensor, column_labels: Tensor, match: str) -> Tensor:
    """Flag the pairs that share a cluster: the IFND false negatives.

    Args:
        anchor_labels: [n, G] long pseudo-labels of the anchors (-1 = not accepted).
        column_labels: [M, G] long pseudo-labels of the similarity columns.
        match: ``"any"`` (same cluster at one granularity or more) or ``"all"`` (at every
            granularity); at a granularity a pair matches when both labels are >= 0 and equal.

    Returns:
        [n, M] bool on ``anchor_labels``'s device. With G = 0 nothing is flagged.

    Every column is judged, the positive and the anchor's own columns too: the caller removes
    those (they are not negatives).
    """
    if match not in MATCHES:
        raise ValueError(f"match must be one of {MATCHES}, got {match!r}")
    if anchor_labels.dim() != 2 or column_labels.dim() != 2:
        raise ValueError(
            f"labels must be [n, G] and [M, G], got {tuple(anchor_labels.shape)} and "
            f"{tuple(column_labels.shape)}"
        )
    if anchor_labels.shape[1] != column_labels.shape[1]:
        raise ValueError(
            f"anchor and column labels have {anchor_labels.shape[1]} and "
            f"{column_labels.shape[1]} granularities"
        )
    a = anchor_labels.long()
    b = column_labels.to(a.device).long()
    n, g = a.shape
    out = torch.zeros(n, b.shape[0], dtype=torch.bool, device=a.device)
    if g == 0:
        return out
    if match == "all":
        out.fill_(True)
    for j in range(g):
        same = (a[:, j, None] == b[None, :, j]) & (a[:, j, None] >= 0) & (b[None, :, j] >= 0)
        if match == "any":
            out |= same
        else:
            out &= same
    return out
