"""Frozen towers (``model.lock_image`` / ``model.lock_text``, open_clip's LiT flags) and
activation checkpointing (``train.grad_checkpointing``) in real training steps."""

from __future__ import annotations

import pytest
import torch

from clipfnd.config import ConfigError, load_config
from clipfnd.errors import UserError
from clipfnd.models import create_clip, set_grad_checkpointing
from clipfnd.state import StateTables
from clipfnd.train.build import build_run
from clipfnd.train.objective import ClipObjective


def _cfg(shapes, run, *extra):
    return load_config(
        None,
        [
            f"output_dir={run}",
            f"data.train={shapes / 'train'}",
            "data.num_workers=0",
            "data.batch_size=64",
            "train.progress=false",
            "train.report_to=none",
            "train.plots=false",
            "eval.at_end=false",
            "optim.warmup_steps=1",
            "optim.lr=1e-3",
            *extra,
        ],
    )


@pytest.mark.parametrize(
    "lock,frozen_prefix",
    [("model.lock_image=true", "visual."), ("model.lock_text=true", "transformer.")],
)
def test_a_locked_tower_stays_bit_identical_and_has_no_optimiser_state(
    shapes, tmp_path, lock, frozen_prefix
):
    cfg = _cfg(shapes, tmp_path / "run", lock)
    s = build_run(cfg)
    model = s.accelerator.unwrap_model(s.model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    batches = iter(s.stream.epoch(0))
    for _ in range(2):
        assert s.optimizer_step(batches, 0, False).status == "taken"
    frozen = [n for n in before if n.startswith(frozen_prefix)]
    assert frozen
    for n, p in model.named_parameters():
        if n.startswith(frozen_prefix):
            assert not p.requires_grad and torch.equal(p, before[n]), n
    trained = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert trained and not any(n.startswith(frozen_prefix) for n in trained)
    in_optimiser = {id(p) for g in s.optimizer.param_groups for p in g["params"]}
    for n, p in model.named_parameters():
        if n.startswith(frozen_prefix):
            assert id(p) not in in_optimiser and p not in s.optimizer.state, n


def test_unlocked_groups_keep_the_last_groups_training(shapes, tmp_path):
    cfg = _cfg(
        shapes, tmp_path / "run", "model.lock_image=true", "model.lock_image_unlocked_groups=1"
    )
    s = build_run(cfg)
    visual = s.accelerator.unwrap_model(s.model).visual
    trainable = [n for n, p in visual.named_parameters() if p.requires_grad]
    frozen = [n for n, p in visual.named_parameters() if not p.requires_grad]
    assert trainable and frozen  # open_clip's grouping: the last group (head) trains


def test_grad_checkpointing_gives_the_same_gradients():
    cfg = load_config(None, ["data.train=unused"])
    grads = []
    for ckpt in (False, True):
        torch.manual_seed(0)
        bundle = create_clip("clipfnd-tiny-vit")
        model = bundle.model.train()
        if ckpt:
            set_grad_checkpointing(model, "clipfnd-tiny-vit")
        obj = ClipObjective(cfg, StateTables(16), has_labels=False)
        g = torch.Generator().manual_seed(1)
        size = model.visual.image_size
        size = size[0] if isinstance(size, (tuple, list)) else size
        batch = {
            "image": torch.randn(16, 3, size, size, generator=g),
            "text": bundle.tokenizer([f"a caption number {i}" for i in range(16)]),
            "index": torch.arange(16),
            "label": -torch.ones(16, dtype=torch.long),
        }
        obj.batch_loss(model, batch, torch.device("cpu"), 0, False).loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert set(grads[0]) == set(grads[1])
    for n in grads[0]:
        torch.testing.assert_close(grads[1][n], grads[0][n], atol=1e-6, rtol=1e-5, msg=n)


def test_grad_checkpointing_refused_where_the_model_has_none(digits, tmp_path):
    cfg = load_config(
        "configs/simclr_digits_simclr.yaml",
        [
            f"output_dir={tmp_path / 'r'}",
            f"data.train={digits / 'train'}",
            f"data.val={digits / 'val'}",
            "train.grad_checkpointing=true",
        ],
    )
    with pytest.raises(UserError, match="no activation checkpointing"):
        build_run(cfg)


def test_locks_are_for_clip_runs():
    with pytest.raises(ConfigError, match="model.lock_image freezes a tower"):
        load_config(None, ["data.train=x", "mode=simclr", "model.lock_image=true"])
    with pytest.raises(ConfigError, match="lock_text_unlocked_layers must be >= 0"):
        load_config(None, ["data.train=x", "model.lock_text_unlocked_layers=-1"])


def test_a_compiled_step_agrees_with_an_eager_one(shapes, tmp_path):
    """``train.compile``: the same step (seeded model, same batch) eager and through
    torch.compile (backend aot_eager: dynamo's graph capture and AOTAutograd, without
    inductor's C++ code generation, to stay fast on CI): the same loss and weights after."""
    results = []
    for compiled in (False, True):
        cfg = _cfg(
            shapes,
            tmp_path / f"run{int(compiled)}",
            f"train.compile={str(compiled).lower()}",
            "train.compile_backend=aot_eager",
            "seed=5",
        )
        s = build_run(cfg)
        batches = iter(s.stream.epoch(0))
        r = s.optimizer_step(batches, 0, False)
        assert r.status == "taken"
        model = s.accelerator.unwrap_model(s.model)
        results.append((r.losses[0].item(), {k: v.clone() for k, v in model.state_dict().items()}))
        if compiled:
            assert model._compiled_call_impl is not None
    (l0, w0), (l1, w1) = results
    assert l1 == pytest.approx(l0, abs=1e-5)
    assert set(w0) == set(w1)  # compiling keeps the state dict's keys (checkpoints unchanged)
    for k in w0:
        torch.testing.assert_close(w1[k], w0[k], atol=1e-5, rtol=1e-4, msg=k)


def test_frozen_bn_statistics_in_a_locked_resnet_tower():
    """``model.lock_image_freeze_bn_stats``: open_clip replaces the image tower's BatchNorms by
    frozen ones, whose statistics no forward in train mode changes."""
    from clipfnd.models import lock_towers

    model = create_clip("RN50").model
    lock_towers(model, lock_image=True, image_freeze_bn_stats=True)
    norms = [m for m in model.visual.modules() if "BatchNorm" in type(m).__name__]
    assert norms and all(type(m).__name__ == "FrozenBatchNorm2d" for m in norms)
    assert not any(p.requires_grad for p in model.visual.parameters())
