"""``fnd.view=clean``: GloFND reads the un-augmented image (its features from a forward
without gradient), the loss the augmented one. The detector's state, flags and counts are
those it would have from the clean features alone; the loss is the method's over the training
view's features with those flags; nothing flows back through the clean view. The key resolves
and refuses where it should."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from clipfnd.config import ConfigError, detection_view, load_config
from clipfnd.methods import AnchorRows
from clipfnd.state import StateTables
from clipfnd.train.objective import ClipObjective
from clipfnd.train.step import cached_window

N, D = 32, 6
OVER = ["data.train=unused", "fnd.detector=glofnd", "fnd.alpha=0.1", "fnd.queue=0"]


def _features():
    g = torch.Generator().manual_seed(0)
    img, txt, clean = (
        F.normalize(torch.randn(N, D, generator=g, dtype=torch.float64), dim=1) for _ in range(3)
    )
    return img.requires_grad_(), txt.requires_grad_(), clean.requires_grad_()


def _objective():
    cfg = load_config(None, OVER)
    obj = ClipObjective(cfg, StateTables(N), has_labels=True)
    flags: list[dict] = []
    detect = obj.detector.detect

    def capture(inp):
        found = detect(inp)
        flags.append(found.flags)
        return found

    obj.detector.detect = capture
    return obj, flags


def test_the_detector_reads_the_clean_view_and_the_loss_the_training_view():
    img, txt, clean = _features()
    scale = torch.tensor(10.0, dtype=torch.float64, requires_grad=True)  # the temperature
    index, label = torch.arange(N), torch.arange(N) % 4
    both, flags_both = _objective()
    alone, flags_clean = _objective()  # the clean view as the only image features
    train, flags_train = _objective()  # the training view as the detector's too
    for step in range(3):  # the first visit places thresholds; later ones flag from them
        out = both(img, txt, clean, scale, index, label, epoch=step)
        want = alone(clean.detach(), txt.detach(), scale, index, label, epoch=step)
        other = train(img.detach(), txt.detach(), scale, index, label, epoch=step)
        for o, obj in ((out, both), (want, alone), (other, train)):
            obj.commit(o)
    for key, value in alone.tables.state_dict()["tables"].items():
        torch.testing.assert_close(both.tables[key], value, atol=0, rtol=0, msg=key)
    assert torch.equal(out.detection, want.detection)
    for t in ("img", "txt"):
        assert torch.equal(flags_both[-1][t], flags_clean[-1][t])
        assert flags_both[-1][t].any()
    assert any(not torch.equal(flags_both[-1][t], flags_train[-1][t]) for t in ("img", "txt"))
    pos = torch.arange(N)
    rows = {
        "img": AnchorRows(img, txt, pos, flags_both[-1]["img"]),
        "txt": AnchorRows(txt, img, pos, flags_both[-1]["txt"]),
    }
    expected = both.method.loss(rows, index, scale, 2).loss
    torch.testing.assert_close(out.loss, expected, atol=1e-12, rtol=0)
    got = torch.autograd.grad(out.loss, (img, txt, scale), retain_graph=True)
    want = torch.autograd.grad(expected, (img, txt, scale))
    for g, w in zip(got, want, strict=True):  # the features' and the temperature's
        torch.testing.assert_close(g, w, atol=1e-12, rtol=0)
    assert got[2].abs() > 0
    out.loss.backward()
    assert img.grad is not None and img.grad.abs().sum() > 0
    assert clean.grad is None  # no gradient through the clean view


class _Towers(torch.nn.Module):
    """Linear towers standing for a CLIP model; counts the image-only forwards (the clean
    view's)."""

    def __init__(self):
        super().__init__()
        self.wi = torch.nn.Linear(D, D, dtype=torch.float64)
        self.wt = torch.nn.Linear(D, D, dtype=torch.float64)
        self.clean_forwards = 0

    def forward(self, image=None, text=None):
        if text is None:
            self.clean_forwards += 1
        return {
            "image_features": F.normalize(self.wi(image.flatten(1)), dim=1),
            "text_features": None if text is None else F.normalize(self.wt(text), dim=1),
            "logit_scale": torch.tensor(10.0, dtype=torch.float64),
        }


def test_the_clean_forward_runs_only_while_the_detector_reads_it():
    """Before ``fnd.start_update`` (and ``start_mask``) GloFND reads nothing: no clean forward,
    in one batch and in cached accumulation; from then on, one per micro-batch."""
    cfg = load_config(None, [*OVER, "fnd.start_update=2", "fnd.start_mask=2"])
    obj = ClipObjective(cfg, StateTables(N), has_labels=True)
    model = _Towers()
    g = torch.Generator().manual_seed(1)
    image = torch.randn(N, 2, 1, 1, D, generator=g, dtype=torch.float64)  # train, clean views
    batch = {"image": image, "text": torch.randn(N, D, generator=g, dtype=torch.float64)}
    batch |= {"index": torch.arange(N), "label": torch.arange(N) % 4}
    obj.batch_loss(model, batch, torch.device("cpu"), epoch=0, measure=False)
    assert model.clean_forwards == 0
    halves = [
        {k: v[: N // 2] for k, v in batch.items()},
        {k: v[N // 2 :] for k, v in batch.items()},
    ]
    for epoch, want in ((1, 0), (2, 2)):
        model.clean_forwards = 0
        cached_window(
            obj,
            model,
            halves,
            torch.device("cpu"),
            epoch,
            False,
            lambda loss: loss.backward(),
            lambda last: contextlib.nullcontext(),
            lambda loss: True,
        )
        assert model.clean_forwards == want, epoch
    model.clean_forwards = 0
    obj.batch_loss(model, batch, torch.device("cpu"), epoch=2, measure=False)
    assert model.clean_forwards == 1


def test_view_resolves_and_refuses():
    clip = load_config(None, OVER)
    assert detection_view(clip) == "clean"
    assert detection_view(load_config(None, [*OVER, "fnd.view=train"])) == "train"
    assert detection_view(load_config(None, ["data.train=unused"])) == "train"
    simclr = load_config(None, ["data.train=unused", "mode=simclr", "fnd.detector=glofnd"])
    assert detection_view(simclr) == "train"
    with pytest.raises(ConfigError, match="fnd.view=clean is for GloFND in image-text"):
        load_config(None, ["data.train=unused", "mode=simclr", "fnd.view=clean"])
    with pytest.raises(ConfigError, match="fnd.view=clean is for GloFND"):
        load_config(None, ["data.train=unused", "fnd.detector=oracle", "fnd.view=clean"])
    with pytest.raises(ConfigError, match="fnd.view='sharp' is not one of"):
        load_config(None, ["data.train=unused", "fnd.view=sharp"])
