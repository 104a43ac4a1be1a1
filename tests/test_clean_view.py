"""``fnd.view=clean``: GloFND reads the un-augmented image (its features from a forward
without gradient), the loss the augmented one. The detector's state, flags and counts are
those it would have from the clean features alone; the loss is the method's over the training
view's features with those flags; nothing flows back through the clean view. The key resolves
and refuses where it should."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from clipfnd.config import ConfigError, detection_view, load_config
from clipfnd.methods import AnchorRows
from clipfnd.state import StateTables
from clipfnd.train.objective import ClipObjective

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
    scale = torch.tensor(10.0, dtype=torch.float64)
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
    out.loss.backward()
    assert img.grad is not None and img.grad.abs().sum() > 0
    assert clean.grad is None  # no gradient through the clean view


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
