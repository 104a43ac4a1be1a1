"""The optimiser step of the training recipe, in-process on the test shapes:

- a skipped step leaves every per-sample table bit-identical (non-finite gradient with a
  finite loss; fp16 overflow skipped by a real gradient scaler; an accumulation window whose
  last micro-batch is non-finite);
- with gradient accumulation every optimiser step belongs to one epoch, and a resume at an
  epoch's end continues exactly;
- the learning-rate schedule is open_clip's (the first step already learns), and FastCLIP's
  temperature schedule is available.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from clipfnd.config import load_config
from clipfnd.train.build import build_run
from clipfnd.train.loop import train
from clipfnd.train.schedule import (
    apply_tau_rule,
    build_scheduler,
    lr_factor,
    optimizer_steps_in_epoch,
)


def _cfg(shapes, run, *extra: str):
    return load_config(
        None,
        [
            f"output_dir={run}",
            f"data.train={shapes / 'train'}",
            f"data.val={shapes / 'val'}",
            "data.num_workers=0",
            "data.shuffle_buffer=100",
            "train.log_every=1",
            "train.progress=false",
            "train.report_to=none",
            "train.plots=false",
            "eval.at_end=false",
            "optim.warmup_steps=2",
            "optim.lr=2e-3",
            *extra,
        ],
    )


def _tables(s) -> dict[str, torch.Tensor]:
    return {n: s.tables[n].clone() for n in s.tables.names()}


def _params(s) -> list[torch.Tensor]:
    return [p.detach().clone() for p in s.model.parameters()]


def _assert_unchanged(s, tables, params):
    for n, t in tables.items():
        assert torch.equal(s.tables[n], t), f"table {n} changed on a skipped step"
    for a, b in zip(params, _params(s)):
        assert torch.equal(a, b), "weights changed on a skipped step"


# fastclip_v3 + GloFND from the first step: both the u estimators and the thresholds move
FAULT_RUN = (
    "loss.name=fastclip_v3",
    "fnd.detector=glofnd",
    "fnd.alpha=0.06",
    "fnd.lr=0.1",
    "fnd.start_mask=0",
    "optim.grad_clip=null",
)


@pytest.fixture
def ready(shapes, tmp_path):
    """A set-up run that has taken one good step (its tables moved)."""

    def make(*extra: str):
        cfg = _cfg(shapes, tmp_path / "run", *FAULT_RUN, *extra)
        s = build_run(cfg)
        batches = iter(s.stream.epoch(0))
        before = _tables(s)
        r = s.optimizer_step(batches, epoch=0, logged=False)
        assert r.status == "taken"
        assert any(not torch.equal(s.tables[n], before[n]) for n in before), (
            "a taken step commits rows"
        )
        return cfg, s, batches

    return make


def test_finite_loss_with_non_finite_gradient_changes_no_table(ready):
    cfg, s, batches = ready()
    tables, params, sched = _tables(s), _params(s), s.scheduler.last_epoch
    raw = s.accelerator.unwrap_model(s.model)
    hook = raw.logit_scale.register_hook(lambda g: g * float("nan"))
    r = s.optimizer_step(batches, epoch=0, logged=False)
    hook.remove()
    assert r.status == "skipped"
    _assert_unchanged(s, tables, params)
    assert s.scheduler.last_epoch == sched
    # and the run goes on
    assert s.optimizer_step(batches, epoch=0, logged=False).status == "taken"


def test_fp16_overflow_skipped_by_the_gradient_scaler_changes_no_table(ready):
    """A real ``torch.amp.GradScaler`` (Accelerate makes none on the CPU, so it is attached
    here the way Accelerate attaches it on a GPU): an infinite gradient makes the scaler skip
    the update, and the step must then leave the tables alone too."""
    from accelerate.optimizer import AcceleratedOptimizer

    cfg, s, batches = ready()
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    s.accelerator.scaler = scaler
    s.optimizer = AcceleratedOptimizer(s.optimizer.optimizer, device_placement=False, scaler=scaler)
    s.accelerator._optimizers = [s.optimizer]
    tables, params = _tables(s), _params(s)
    raw = s.accelerator.unwrap_model(s.model)
    hook = raw.visual.conv1.weight.register_hook(lambda g: g * float("inf"))
    r = s.optimizer_step(batches, epoch=0, logged=False)
    hook.remove()
    assert r.status == "overflow"
    assert scaler.get_scale() < 2.0**16  # the scaler really saw the overflow
    _assert_unchanged(s, tables, params)
    r = s.optimizer_step(batches, epoch=0, logged=False)
    assert r.status == "taken" and not torch.equal(s.tables["gcl.u_img"], tables["gcl.u_img"])


class NaNOnCall:
    """The objective, with a NaN loss on its ``n``-th call (a micro-batch gone bad)."""

    def __init__(self, inner, n: int):
        self.inner, self.n, self.calls = inner, n, 0

    def batch_loss(self, *args, **kwargs):
        out = self.inner.batch_loss(*args, **kwargs)
        self.calls += 1
        if self.calls == self.n:
            out.loss = out.loss * float("nan")
        return out

    def commit(self, outs):
        self.inner.commit(outs)


def test_accumulation_window_with_a_non_finite_last_micro_batch_changes_no_table(ready):
    cfg, s, batches = ready("optim.accum_steps=2", "optim.accum_mode=independent")
    tables, params = _tables(s), _params(s)
    s.objective = NaNOnCall(s.objective, n=2)  # the first micro-batch is fine, the second is not
    r = s.optimizer_step(batches, epoch=0, logged=False)
    assert s.objective.calls == 2 and r.status == "skipped"
    _assert_unchanged(s, tables, params)


def test_cached_accumulation_with_a_non_finite_micro_batch_changes_nothing(ready):
    """Cached: the second micro-batch's features are NaN, so the whole window's loss is."""
    cfg, s, batches = ready("optim.accum_steps=2")
    tables, params = _tables(s), _params(s)
    features, calls = s.objective.features, []

    def nan_second(model, batch, device, detect=True):
        feats, scale = features(model, batch, device, detect)
        calls.append(1)
        if len(calls) == 2:  # the cached forward of micro-batch 2
            feats = tuple(f * float("nan") for f in feats)
        return feats, scale

    s.objective.features = nan_second
    r = s.optimizer_step(batches, epoch=0, logged=False)
    assert r.status == "skipped" and len(calls) == 3  # 2 cached, then pass 1 found the NaN
    _assert_unchanged(s, tables, params)


def test_first_step_moves_the_weights(shapes, tmp_path):
    """Warmup starts at lr/W on the first step (open_clip), not at 0."""
    cfg = _cfg(shapes, tmp_path / "run", "optim.warmup_steps=4")
    s = build_run(cfg)
    params = _params(s)
    r = s.optimizer_step(iter(s.stream.epoch(0)), epoch=0, logged=False)
    assert r.status == "taken"
    assert r.lrs[0] == pytest.approx(2e-3 / 4)
    assert any(not torch.equal(a, b) for a, b in zip(params, _params(s)))


def open_clip_lr(step: int, base: float, warmup: int, steps: int) -> float:
    """open_clip's ``cosine_lr`` (src/open_clip_train/scheduler.py), written out."""
    if step < warmup:
        return base * (step + 1) / warmup
    e, es = step - warmup, steps - warmup
    return 0.5 * (1 + math.cos(math.pi * e / es)) * base


@pytest.mark.parametrize("warmup,total", [(0, 7), (3, 10), (10, 10), (1, 1)])
def test_schedule_is_open_clips(warmup, total):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.5)
    sched = build_scheduler(opt, kind="cosine", warmup=warmup, total=total)
    got = []
    for _ in range(total):
        got.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    want = [
        open_clip_lr(k, 0.5, warmup, total) if warmup < total or k < warmup else 0.5
        for k in range(total)
    ]
    assert got == pytest.approx(want, rel=1e-12)
    assert got[0] > 0
    assert lr_factor(5, 2, 10, "constant") == 1.0


def test_fastclip_temperature_schedule():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([{"params": [a]}, {"params": [b], "lr": 2e-4}], lr=0.1)
    sched = build_scheduler(
        opt, kind="cosine", warmup=5, total=20, tau_group=1, tau_schedule="fastclip"
    )
    assert opt.param_groups[0]["lr"] == pytest.approx(0.1 / 5)  # the model warms up
    assert opt.param_groups[1]["lr"] == pytest.approx(2e-4)  # the temperature does not
    for _ in range(12):
        opt.step()
        sched.step()
    assert opt.param_groups[1]["lr"] == pytest.approx(2e-4)  # nor does it decay
    assert apply_tau_rule(opt, 1, 2e-4, tau=0.05) == pytest.approx(2e-4)
    assert apply_tau_rule(opt, 1, 2e-4, tau=0.03) == pytest.approx(2e-4 / 3)
    assert apply_tau_rule(opt, 1, 2e-4, tau=0.031) == pytest.approx(2e-4)  # back above: back up
    sched2 = build_scheduler(
        opt, kind="cosine", warmup=5, total=20, tau_group=1, tau_schedule="model"
    )
    assert sched2.lr_lambdas[1](0) == pytest.approx(1 / 5)


def test_fastclip_tau_schedule_in_a_run(shapes, tmp_path):
    run = tmp_path / "run"
    train(
        _cfg(
            shapes,
            run,
            "loss.name=fastclip_v3",
            "loss.tau_schedule=fastclip",
            "loss.tau=0.025",
            "loss.tau_min=0.01",
            "loss.tau_lr=1e-3",
            "train.max_steps=3",
            "overwrite=true",
        )
    )
    lines = (run / "metrics.jsonl").read_text().splitlines()
    recs = [r for r in map(json.loads, lines) if "loss" in r]  # the step lines
    # tau <= 0.03 from the start
    assert [r["tau_lr"] for r in recs] == pytest.approx([1e-3 / 3] * 3)
    assert recs[0]["lr"] == pytest.approx(2e-3 / 2)  # while the model warms up


# --- gradient accumulation at epoch ends -------------------------------------------------------
def _steps_by_epoch(run) -> dict[int, int]:
    out: dict[int, int] = {}
    for line in (run / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "loss" in rec:
            out[rec["epoch"]] = out.get(rec["epoch"], 0) + 1
    return out


@pytest.mark.parametrize("accum", [1, 2, 3, 5])
def test_every_optimiser_step_belongs_to_one_epoch(shapes, tmp_path, accum):
    """8 micro-batches an epoch: accum 2 gives 4 steps an epoch; 3 gives 2 (2 left over, not
    used); 5 gives 1 (3 left over). The schedule's length is the number of steps taken."""
    run = tmp_path / "run"
    cfg = _cfg(shapes, run, f"optim.accum_steps={accum}", "train.epochs=3")
    summary = train(cfg)
    s = build_run(_cfg(shapes, tmp_path / "probe", f"optim.accum_steps={accum}", "train.epochs=3"))
    per_epoch = [optimizer_steps_in_epoch(s.stream, e, accum) for e in range(3)]
    assert per_epoch == [s.stream.steps_per_epoch(e) // accum for e in range(3)] == [8 // accum] * 3
    assert _steps_by_epoch(run) == dict(enumerate(per_epoch))
    assert summary["steps"] == sum(per_epoch) == s.total_steps


def test_resume_at_an_epoch_end_with_accumulation_is_exact(shapes, tmp_path):
    """accum 3: epoch 0 ends after 2 steps with 2 micro-batches unused. Stopping there and
    resuming gives the losses of the uninterrupted run."""
    common = (
        "optim.accum_steps=3",
        "train.epochs=2",
        "optim.schedule=constant",
        "fnd.detector=glofnd",
        "fnd.alpha=0.06",
        "fnd.lr=0.1",
    )
    train(_cfg(shapes, tmp_path / "a", *common))
    train(_cfg(shapes, tmp_path / "b", *common, "train.max_steps=2"))
    summary = train(_cfg(shapes, tmp_path / "b", *common, "resume=latest"))
    assert summary["steps"] == 4

    def losses(run):
        return {
            r["step"]: r["loss"]
            for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())
            if "loss" in r
        }

    a, b = losses(tmp_path / "a"), losses(tmp_path / "b")
    assert sorted(b) == [1, 2, 3, 4]
    for step in (1, 2, 3, 4):
        assert abs(a[step] - b[step]) <= 1e-6, (step, a[step], b[step])


def test_too_many_non_finite_steps_stop_the_run_naming_a_checkpoint(shapes, tmp_path):
    """In-process twin of test_reliability's launch test: the give-up path writes a checkpoint
    from before the fault when none exists, and names it."""
    from clipfnd.train.loop import NonFiniteError

    run = tmp_path / "run"
    cfg = _cfg(
        shapes,
        run,
        "optim.lr=1e30",
        "optim.warmup_steps=0",
        "optim.grad_clip=null",
        "train.max_nonfinite_steps=2",
        "train.checkpoint_every=0",
    )
    with pytest.raises(NonFiniteError, match=r"2 optimiser steps in a row .*/step_00000001"):
        train(cfg)
    assert (run / "checkpoints" / "step_00000001" / "trainer_state.json").is_file()


def test_non_finite_weights_are_never_published_and_the_advice_is_to_start_over(shapes, tmp_path):
    """``optim.lr=inf`` makes every weight non-finite after the first step: no checkpoint is
    written with such weights (not by checkpoint_every, not by the stop), and the message
    says to start over rather than to resume from a poisoned checkpoint."""
    from clipfnd.checkpoints import list_checkpoints
    from clipfnd.train.loop import NonFiniteError, train

    run = tmp_path / "run"
    cfg = _cfg(
        shapes,
        run,
        "optim.lr=inf",
        "optim.warmup_steps=0",
        "optim.grad_clip=null",
        "train.checkpoint_every=1",
        "train.max_nonfinite_steps=2",
    )
    with pytest.raises(NonFiniteError, match="start over with overwrite=true") as e:
        train(cfg)
    assert "resume=latest" not in str(e.value)
    assert list_checkpoints(run) == []
