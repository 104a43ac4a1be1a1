"""``RUN/plots``: which PNGs the metrics allow, with which panels; valid, non-blank images;
drawing in the background never fails a run. ``train.report_to``: its choices and checks."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
from PIL import Image

from clipfnd.config import ConfigError, load_config, report_to
from clipfnd.plots import PlotWriter, panels, read_metrics, write_plots


def _metrics(path, glofnd=True, labels=True, skipped=0):
    lines = []
    for step in range(1, 21):
        r = {"step": step, "epoch": step // 10, "loss": 5.0 / step, "lr": 1e-3, "logit_scale": 14.0}
        if glofnd:
            for t in ("img", "txt"):
                r.update({f"fnd/lambda_{t}_q10": 0.5, f"fnd/lambda_{t}_q50": 0.6})
                r[f"fnd/lambda_{t}_q90"] = 0.7
            r["fnd/flagged_share"] = 0.01 * step
            r["fnd/anchors_all_flagged"] = 0.0
        if glofnd and labels:
            r.update({"fnd/precision": 0.9, "fnd/recall": step / 20})
        if skipped:
            r["data/skipped"] = skipped
        lines.append(r)
        if step % 10 == 0:
            lines.append(
                {"step": step, "epoch": step // 10 - 1, "data/used": 640, "data/skipped": 0}
            )
            lines.append({"step": step, "epoch": step // 10 - 1, "val/i2t_R@1": step / 40})
    path.write_text("".join(json.dumps(r) + "\n" for r in lines) + '{"step": 21, "lo')
    return path


def _png_ok(path):
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.verify()
    with Image.open(path) as im:
        a = np.asarray(im.convert("L"))
    assert a.shape[0] >= 200 and a.shape[1] >= 300
    assert (a < 200).mean() > 0.01, f"{path} looks blank"  # lines and text were drawn


def test_plots_of_a_glofnd_run_with_labels(tmp_path):
    _metrics(tmp_path / "metrics.jsonl")
    files = write_plots(tmp_path)
    index = json.loads((tmp_path / "plots" / "index.json").read_text())
    assert sorted(index) == sorted(p.name for p in files)
    assert index == {
        "loss.png": ["training loss", "learning rate"],
        "temperature.png": ["temperature"],
        "thresholds.png": ["thresholds (img anchors)", "thresholds (txt anchors)"],
        "flagged.png": ["negatives flagged"],
        "detection.png": ["detection against labels"],
        "data.png": ["samples per epoch"],
        "eval.png": ["evaluation"],
    }
    for f in files:
        _png_ok(f)
    assert not list((tmp_path / "plots").glob("*.tmp"))


def test_subjects_without_metrics_have_no_file(tmp_path):
    _metrics(tmp_path / "metrics.jsonl", glofnd=False, skipped=3)
    index = {p.name for p in write_plots(tmp_path)}
    assert "thresholds.png" not in index and "detection.png" not in index
    assert "flagged.png" not in index
    got = panels(read_metrics(tmp_path / "metrics.jsonl"))
    assert [p.title for p in got["data"]] == [
        "samples skipped as bad (so far)",
        "samples per epoch",
    ]


def test_series_values_come_from_the_lines(tmp_path):
    _metrics(tmp_path / "metrics.jsonl")
    records = read_metrics(tmp_path / "metrics.jsonl")
    assert len(records) == 24  # the line cut short is left out
    got = panels(records)
    (label, xs, ys) = got["temperature"][0].lines[0]
    assert xs == list(range(1, 21)) and ys == pytest.approx([1 / 14.0] * 20)
    recall = dict((n, (x, y)) for n, x, y in got["detection"][0].lines)["recall"]
    assert recall[1][-1] == 1.0


def test_plot_writer_draws_in_the_background_and_never_raises(tmp_path, caplog):
    _metrics(tmp_path / "metrics.jsonl")
    w = PlotWriter(tmp_path)
    w.request()
    w.request()
    w.close()
    assert (tmp_path / "plots" / "loss.png").is_file() and w.seconds > 0
    (tmp_path / "bad").write_text("a file where the run folder should be")
    bad = PlotWriter(tmp_path / "bad")
    with caplog.at_level(logging.WARNING):
        bad.request()
        bad.close()  # a warning, not an exception
    assert "could not draw the plots" in caplog.text


def test_report_to_choices(monkeypatch):
    assert report_to(load_config(None, ["data.train=x"])) == ["tensorboard"]
    assert report_to(load_config(None, ["data.train=x", "train.report_to=none"])) == []
    legacy = load_config(None, ["data.train=x", "train.tensorboard=false"])
    assert report_to(legacy) == [] and legacy.train.tensorboard is None
    with pytest.raises(ConfigError, match="train.report_to='mlflow'"):
        load_config(None, ["data.train=x", "train.report_to=mlflow"])
    with pytest.raises(ConfigError, match="give none, or"):
        load_config(None, ["data.train=x", "train.report_to='none,wandb'"])
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda n, *a: None if n == "wandb" else real(n, *a)
    )
    with pytest.raises(ConfigError, match=r"pip install 'clipfnd\[wandb\]'"):
        load_config(None, ["data.train=x", "train.report_to=wandb"])
