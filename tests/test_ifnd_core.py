"""IFND core (clipfnd.fnd.clustering): k-means, confidence, incremental acceptance, flags."""

from __future__ import annotations

import importlib.util
import math

import pytest
import torch
import torch.nn.functional as F

from clipfnd.fnd.clustering import (
    _update,
    accept,
    acceptance_ratio,
    cluster_hierarchy,
    flags_from_labels,
    kmeans,
    pseudo_labels,
)

HAS_FAISS = importlib.util.find_spec("faiss") is not None


def _blobs(n_per: int = 40, d: int = 16, centers: int = 3, noise: float = 0.05, seed: int = 0):
    """Well-separated blobs on the sphere: features [centers * n_per, d] and true labels."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.eye(d)[:centers]  # orthogonal directions: cosine 0 between blobs
    labels = torch.arange(centers).repeat_interleave(n_per)
    x = mu[labels] + noise * torch.randn(len(labels), d, generator=g)
    perm = torch.randperm(len(labels), generator=g)
    return F.normalize(x[perm], dim=1), labels[perm]


def _same_partition(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to a permutation of the cluster ids."""
    pairs = set(zip(a.tolist(), b.tolist()))
    return len(pairs) == len(set(a.tolist())) == len(set(b.tolist()))


def test_kmeans_recovers_blobs():
    x, labels = _blobs()
    centroids, assign = kmeans(x, 3, seed=0, backend="torch")
    assert centroids.shape == (3, x.shape[1]) and centroids.dtype == torch.float32
    assert assign.shape == (x.shape[0],) and assign.dtype == torch.long
    assert _same_partition(assign, labels)
    torch.testing.assert_close(centroids.norm(dim=1), torch.ones(3))
    # centroids are the normalised member means
    for c in range(3):
        mean = F.normalize(x[assign == c].mean(0), dim=0)
        torch.testing.assert_close(centroids[c], mean, atol=1e-5, rtol=0)


def test_kmeans_deterministic_and_seeded():
    x, _ = _blobs(n_per=50, centers=5, noise=0.4, seed=1)
    c1, a1 = kmeans(x, 7, seed=3, backend="torch")
    c2, a2 = kmeans(x.clone(), 7, seed=3, backend="torch")
    assert torch.equal(c1, c2) and torch.equal(a1, a2)
    # input scale does not matter (rows are normalised inside)
    c3, a3 = kmeans(2.0 * x, 7, seed=3, backend="torch")
    assert torch.equal(a1, a3)


@pytest.mark.parametrize("k", [0, -1, 11])
def test_kmeans_bad_k(k):
    x = F.normalize(torch.randn(10, 4), dim=1)
    with pytest.raises(ValueError, match=rf"k={k}.*N=10"):
        kmeans(x, k, seed=0, backend="torch")


def test_kmeans_k_equals_n():
    x = F.normalize(torch.randn(6, 4, generator=torch.Generator().manual_seed(0)), dim=1)
    _, assign = kmeans(x, 6, seed=0, backend="torch")
    assert sorted(assign.tolist()) == list(range(6))


def test_kmeans_fewer_distinct_points_than_k():
    # 3 distinct directions, each repeated 4 times, and k = 5: two clusters must stay empty
    base = F.normalize(torch.randn(3, 8, generator=torch.Generator().manual_seed(0)), dim=1)
    x = base.repeat(4, 1)
    group = torch.arange(3).repeat(4)
    centroids, assign = kmeans(x, 5, seed=0, backend="torch")
    assert ((assign >= 0) & (assign < 5)).all()
    assert torch.isfinite(centroids).all()
    torch.testing.assert_close(centroids.norm(dim=1), torch.ones(5))
    assert _same_partition(assign, group)
    c2, a2 = kmeans(x, 5, seed=0, backend="torch")
    assert torch.equal(centroids, c2) and torch.equal(assign, a2)


def test_empty_cluster_reseeded_with_farthest_point():
    # cluster 2 has no members: it takes the point farthest from its own centroid
    x = F.normalize(
        torch.tensor([[1.0, 0.0], [1.0, 0.1], [0.0, 1.0], [0.1, 1.0], [1.0, 1.0], [-1.0, 0.2]]),
        dim=1,
    )
    assign = torch.tensor([0, 0, 1, 1, 1, 0])
    centroids = _update(x, assign, 3)
    assert torch.isfinite(centroids).all()
    own = (x * centroids[assign]).sum(1)
    far = int(own.argmin())
    assert far == 5
    torch.testing.assert_close(centroids[2], x[far])
    # and the next assignment fills it
    new = (x @ centroids.T).argmax(1)
    assert (new == 2).any()


def test_cluster_hierarchy_confidence_matches_loop():
    x, _ = _blobs(n_per=30, centers=4, noise=0.5, seed=2)
    ks = [3, 5, 8]
    assign, conf = cluster_hierarchy(x, ks, seed=7, backend="torch")
    assert assign.shape == (3, x.shape[0]) and conf.shape == (3, x.shape[0])
    assert assign.dtype == torch.long and conf.dtype == torch.float32
    x64 = x.double()
    for g, k in enumerate(ks):
        assert int(assign[g].max()) < k
        # seed + g per granularity
        _, a = kmeans(x, k, seed=7 + g, backend="torch")
        assert torch.equal(a, assign[g])
        for n in range(x.shape[0]):
            members = x64[assign[g] == assign[g, n]]
            centroid = members.mean(0)
            centroid = centroid / centroid.norm()
            expect = float(x64[n] @ centroid)
            assert abs(float(conf[g, n]) - expect) < 1e-5
    a2, c2 = cluster_hierarchy(x, ks, seed=7, backend="torch")
    assert torch.equal(assign, a2) and torch.equal(conf, c2)


def test_acceptance_ratio():
    assert acceptance_ratio(0, 2, 10, 0.2) == 0.0
    assert acceptance_ratio(1, 2, 10, 0.2) == 0.0
    assert acceptance_ratio(2, 2, 10, 0.2) == pytest.approx(0.2)
    assert acceptance_ratio(6, 2, 10, 0.2) == pytest.approx(0.6)
    assert acceptance_ratio(10, 2, 10, 0.2) == 1.0
    assert acceptance_ratio(12, 2, 10, 0.2) == 1.0
    assert acceptance_ratio(5, 0, 10) == pytest.approx(0.5)
    # degenerate schedule: everything from start_epoch on
    assert acceptance_ratio(2, 3, 3) == 0.0
    assert acceptance_ratio(3, 3, 3) == 1.0
    assert acceptance_ratio(4, 5, 2) == 0.0
    assert acceptance_ratio(5, 5, 2) == 1.0
    with pytest.raises(ValueError):
        acceptance_ratio(0, 0, 10, 1.5)


def _naive_accept(conf, ratio, valid):
    out = []
    for row in conf.tolist():
        idx = [i for i in range(len(row)) if valid[i]]
        idx.sort(key=lambda i: (-row[i], i))
        m = round(ratio * len(idx))
        chosen = set(idx[:m])
        out.append([i in chosen for i in range(len(row))])
    return torch.tensor(out, dtype=torch.bool)


@pytest.mark.parametrize("ratio", [0.0, 0.13, 0.5, 0.77, 1.0])
def test_accept_matches_naive(ratio):
    g = torch.Generator().manual_seed(0)
    # rounded to create ties, which go to the lower index
    conf = (torch.rand(3, 40, generator=g) * 10).round() / 10
    valid = torch.rand(40, generator=g) > 0.3
    got = accept(conf, ratio, valid)
    assert torch.equal(got, _naive_accept(conf, ratio, valid.tolist()))
    assert not got[:, ~valid].any()
    assert (got.sum(1) == round(ratio * int(valid.sum()))).all()
    all_valid = accept(conf, ratio)
    assert torch.equal(all_valid, _naive_accept(conf, ratio, [True] * 40))


def test_accept_edges():
    conf = torch.tensor([[0.5, 0.9, 0.1, 0.9]])
    assert not accept(conf, 0.0).any()
    assert accept(conf, 1.0).all()
    assert accept(conf, 0.25).tolist() == [[False, True, False, False]]  # tie -> lower index
    valid = torch.tensor([True, False, True, False])
    assert accept(conf, 1.0, valid).tolist() == [[True, False, True, False]]
    with pytest.raises(ValueError):
        accept(conf, 1.1)


def test_pseudo_labels():
    assign = torch.tensor([[0, 1, 2], [3, 3, 0]])
    accepted = torch.tensor([[True, False, True], [False, True, True]])
    assert pseudo_labels(assign, accepted).tolist() == [[0, -1, 2], [-1, 3, 0]]


@pytest.mark.parametrize("match", ["any", "all"])
def test_flags_match_naive(match):
    g = torch.Generator().manual_seed(1)
    a = torch.randint(-1, 3, (7, 3), generator=g)
    b = torch.randint(-1, 3, (11, 3), generator=g)
    got = flags_from_labels(a, b, match)
    assert got.shape == (7, 11) and got.dtype == torch.bool
    combine = any if match == "any" else all
    for i in range(7):
        for j in range(11):
            hits = [a[i, k] >= 0 and b[j, k] >= 0 and a[i, k] == b[j, k] for k in range(3)]
            assert bool(got[i, j]) == combine(bool(h) for h in hits), (i, j)
    assert (a == -1).any() and (b == -1).any()


def test_flags_examples_and_errors():
    a = torch.tensor([[0, 1], [-1, 2], [-1, -1]])
    b = torch.tensor([[0, 1], [0, 2], [-1, -1]])
    assert flags_from_labels(a, b, "any").tolist() == [
        [True, True, False],
        [False, True, False],
        [False, False, False],
    ]
    assert flags_from_labels(a, b, "all").tolist() == [
        [True, False, False],
        [False, False, False],
        [False, False, False],
    ]
    with pytest.raises(ValueError, match="match"):
        flags_from_labels(a, b, "some")


@pytest.mark.skipif(HAS_FAISS, reason="faiss is installed")
def test_faiss_backend_missing():
    x = F.normalize(torch.randn(10, 4), dim=1)
    with pytest.raises(ImportError, match="pip install faiss-cpu"):
        kmeans(x, 2, seed=0, backend="faiss")
    with pytest.raises(ImportError, match="pip install faiss-cpu"):
        cluster_hierarchy(x, [2], seed=0, backend="faiss")
    # auto falls back to torch
    assert torch.equal(kmeans(x, 2, seed=0)[1], kmeans(x, 2, seed=0, backend="torch")[1])


def test_bad_backend():
    x = F.normalize(torch.randn(10, 4), dim=1)
    with pytest.raises(ValueError, match="backend"):
        kmeans(x, 2, seed=0, backend="sklearn")


def test_progress_bar_runs(capsys):
    x, _ = _blobs(n_per=10)
    assign, conf = cluster_hierarchy(x, [2, 3], seed=0, backend="torch", progress=True)
    assert assign.shape == (2, 30)
    assert not math.isnan(float(conf.sum()))


def test_faiss_path_with_stub(monkeypatch):
    """The faiss glue, against a stand-in module (real faiss is optional)."""
    import sys
    import types

    import numpy as np

    calls = {}

    class _Index:
        def __init__(self, centroids):
            self.centroids = centroids

        def search(self, xn, kk):
            sims = xn @ self.centroids.T
            return sims.max(1, keepdims=True), sims.argmax(1)[:, None].astype(np.int64)

    class Kmeans:
        def __init__(self, d, k, **kw):
            calls.update(kw, d=d, k=k)
            self.k = k

        def train(self, xn):
            c, _ = kmeans(torch.from_numpy(xn), self.k, seed=calls["seed"], backend="torch")
            self.centroids = c.numpy()
            self.index = _Index(self.centroids)

    monkeypatch.setitem(sys.modules, "faiss", types.SimpleNamespace(Kmeans=Kmeans))
    x, labels = _blobs()
    centroids, assign = kmeans(x, 3, seed=5, iters=20, backend="faiss")
    assert calls == {"niter": 20, "seed": 5, "spherical": True, "verbose": False, "d": 16, "k": 3}
    assert _same_partition(assign, labels) and assign.dtype == torch.long
    torch.testing.assert_close(centroids.norm(dim=1), torch.ones(3))
    a_auto, _ = cluster_hierarchy(x, [3], seed=5, backend="auto")
    assert _same_partition(a_auto[0], labels)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")
def test_cuda_device_and_determinism():
    x, labels = _blobs(n_per=50, centers=5, noise=0.3)
    xc = x.cuda()
    assign, conf = cluster_hierarchy(xc, [5, 9], seed=0, backend="torch")
    assert assign.device == xc.device and conf.device == xc.device
    a2, c2 = cluster_hierarchy(xc, [5, 9], seed=0, backend="torch")
    assert torch.equal(assign, a2) and torch.equal(conf, c2)
    acc = accept(conf, 0.5, torch.ones(x.shape[0], dtype=torch.bool))
    assert acc.device == xc.device
    labels_ = pseudo_labels(assign, acc).T
    assert flags_from_labels(labels_[:4], labels_, "any").device == xc.device
