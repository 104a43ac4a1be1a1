"""A training step of the real model and objective on in-memory tensors, and a timer that
measures two variants side by side (interleaved), so machine noise hits both alike."""

from __future__ import annotations

import itertools
import platform
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from clipfnd.config import detection_view, load_config
from clipfnd.models import create_clip
from clipfnd.state import StateTables
from clipfnd.train.objective import ClipObjective


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def describe_device() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"CPU ({platform.machine()}, {torch.get_num_threads()} threads)"


def make_step(
    overrides: list[str],
    batch: int,
    num_rows: int,
    model_name: str = "clipfnd-tiny-vit",
    seed: int = 0,
) -> Callable[[], None]:
    """A closure running one optimiser step (forward, objective, backward, AdamW step) on a
    fixed random batch whose dataset indices are drawn from ``num_rows`` rows."""
    torch.manual_seed(seed)
    cfg = load_config(None, ["data.train=unused", *overrides])
    dev = device()
    bundle = create_clip(model_name)
    model = bundle.model.to(dev).train()
    size = model.visual.image_size
    size = size[0] if isinstance(size, tuple) else size
    images = torch.randn(batch, 3, size, size, device=dev)
    if detection_view(cfg) == "clean":  # GloFND's clean view beside the training view
        images = torch.stack([images, torch.randn_like(images)], dim=1)
    text = bundle.tokenizer(["a red circle in the top left"] * batch).to(dev)
    tables = StateTables(num_rows, dev)
    objective = ClipObjective(cfg, tables, has_labels=True)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 64, (batch,), generator=g).to(dev)
    # distinct dataset indices per batch, drawn before timing (their cost is not the step's)
    batches = itertools.cycle(
        [
            torch.from_numpy(
                np.random.default_rng([seed, k]).choice(num_rows, batch, replace=False)
            ).to(dev)
            for k in range(16)
        ]
    )

    def step() -> None:
        batch = {"image": images, "text": text, "index": next(batches), "label": labels}
        # an unlogged step: detection quality is scored on logged steps only (1 in log_every)
        res = objective.batch_loss(model, batch, dev, epoch=1, measure=False)
        objective.commit(res)
        res.loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def interleaved(
    a: Callable[[], None], b: Callable[[], None], repeats: int, warmup: int = 2
) -> tuple[list[float], list[float]]:
    """Seconds per call of ``a`` and ``b``, alternating a, b, a, b, ... after warm-up."""
    for _ in range(warmup):
        a()
        b()
    ta, tb = [], []
    for _ in range(repeats):
        for fn, out in ((a, ta), (b, tb)):
            t0 = time.perf_counter()
            fn()
            if torch.cuda.is_available():
                torch.cuda.synchronize()
            out.append(time.perf_counter() - t0)
    return ta, tb


def ratio_of_medians(ta: list[float], tb: list[float]) -> float:
    return statistics.median(ta) / statistics.median(tb)
