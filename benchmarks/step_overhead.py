"""What clipfnd's training step costs beyond the model: its real step (``Run.optimizer_step``:
forward, pairs, loss, tables, backward, clipping, AdamW, scheduler) against the step open_clip's
``train_one_epoch`` runs (forward, ``ClipLoss``, backward, AdamW, the ``logit_scale`` clamp), on
the same model, weights and in-memory batches, timed interleaved.

    python benchmarks/step_overhead.py [--model tiny|NAME] [--batch 128] [--precision fp32|bf16]
                                       [--repeats 20] [--profile]

Both steps take the same batches already in memory (the loader is measured by
``benchmarks/loader.py``; data wait by each trainer's ``data_time``). ``--profile`` also
prints where clipfnd's step spends its time (cProfile, top entries by own time), the account
of anything outside the model's forward, backward and optimiser step.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import cProfile
import math
import pstats
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from vs_open_clip import model_and_data  # noqa: E402


def build(a):
    """clipfnd's run on synthetic shards at the model's side, and a few batches of it."""
    from clipfnd.config import load_config
    from clipfnd.train.build import build_run

    model, data = model_and_data(a.model, 4 * a.batch, shard_size=a.batch)
    run_dir = tempfile.mkdtemp(prefix="step_overhead_")
    overrides = [
        f"model.name={model}",
        f"data.train={data / 'train'}",
        "data.val=null",
        f"data.batch_size={a.batch}",
        "data.num_workers=0",
        "optim.grad_clip=null",
        "train.report_to=none",
        "train.progress=false",
        "fnd.detector=none",
        f"output_dir={run_dir}",
    ]
    if a.precision == "bf16":
        overrides.append("train.mixed_precision=bf16")
    cfg = load_config(ROOT / "configs" / "demo.yaml", overrides + a.overrides)
    run = build_run(cfg)
    batches = list(run.stream.epoch(0))[:4]
    return run, batches


def open_clip_step(run, batches, a):
    """open_clip's train_one_epoch step (``open_clip_train/train.py``) on a copy of the model."""
    from open_clip.loss import ClipLoss

    model = copy.deepcopy(run.accelerator.unwrap_model(run.model))
    decay = [p for n, p in model.named_parameters() if p.ndim >= 2]
    rest = [p for n, p in model.named_parameters() if p.ndim < 2]
    opt = torch.optim.AdamW(
        [{"params": rest, "weight_decay": 0.0}, {"params": decay, "weight_decay": 0.1}],
        lr=1e-3,
        betas=(0.9, 0.98),
        eps=1e-6,
    )
    loss_fn = ClipLoss()
    normalize = run.objective.normalize
    autocast = (
        (lambda: torch.autocast("cpu", dtype=torch.bfloat16))
        if a.precision == "bf16"
        else contextlib.nullcontext
    )
    it = iter(range(10**9))

    def step() -> None:
        b = batches[next(it) % len(batches)]
        images = b["image"]
        images = normalize(images) if images.dtype == torch.uint8 else images
        with autocast():
            out = model(image=images, text=b["text"])
            loss = loss_fn(out["image_features"], out["text_features"], out["logit_scale"])
        loss.backward()
        opt.step()
        opt.zero_grad()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))

    return step


def clipfnd_step(run, batches):
    it = iter(range(10**9))

    def step() -> None:
        b = batches[next(it) % len(batches)]
        r = run.optimizer_step(iter([b]), 0, logged=False)
        assert r.status == "taken", r.status

    return step


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="tiny")
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--profile", action="store_true")
    p.add_argument("overrides", nargs="*", help="more config overrides for clipfnd's run")
    a = p.parse_args()
    run, batches = build(a)
    ours, theirs = clipfnd_step(run, batches), open_clip_step(run, batches, a)
    for _ in range(2):
        ours(), theirs()
    t_ours, t_theirs = [], []
    for _ in range(a.repeats):
        for fn, out in ((ours, t_ours), (theirs, t_theirs)):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    mo, mt = statistics.median(t_ours), statistics.median(t_theirs)
    print(
        f"{a.model}, batch {a.batch}, {a.precision}, {torch.get_num_threads()} threads, "
        f"{a.repeats} steps each, interleaved (medians; spread min-max)"
    )
    print(
        f"  open_clip's step {1e3 * mt:8.1f} ms ({1e3 * min(t_theirs):.1f}-{1e3 * max(t_theirs):.1f})"
    )
    print(
        f"  clipfnd's step   {1e3 * mo:8.1f} ms ({1e3 * min(t_ours):.1f}-{1e3 * max(t_ours):.1f})"
    )
    print(f"  clipfnd / open_clip step time: {mo / mt:.3f}  (overhead {1e3 * (mo - mt):+.1f} ms)")
    if a.profile:
        prof = cProfile.Profile()
        prof.enable()
        for _ in range(5):
            ours()
        prof.disable()
        pstats.Stats(prof).sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
