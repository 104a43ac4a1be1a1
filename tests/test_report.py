"""``clipfnd report`` and the run's plots and trackers, on two short real runs (CLIP+GloFND on
the test shapes, with TensorBoard and wandb offline; SimCLR+IFND on digits).

The flags the page shows are checked against the run's own objective: the same features, the
checkpoint's tables, the objective's ``__call__`` with the whole encoded split as one batch,
and the flags its detector returned there."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from clipfnd.cli.main import main
from clipfnd.config import from_dict
from clipfnd.report import write_report
from clipfnd.report.page import summary_json
from clipfnd.report.scoring import read_tables
from clipfnd.state.files import load_tables
from clipfnd.train.objective import OBJECTIVES

COMMON = [
    "data.num_workers=0",
    "train.progress=false",
    "train.plots=true",
    "eval.batch_size=256",
]


@pytest.fixture(scope="module")
def clip_run(shapes, tmp_path_factory):
    """CLIP + GloFND, 3 epochs of 8 steps, flags from epoch 1; TensorBoard and wandb (offline)."""
    run = tmp_path_factory.mktemp("report") / "clip"
    mp = pytest.MonkeyPatch()
    mp.setenv("WANDB_MODE", "offline")
    mp.setenv("WANDB_SILENT", "true")
    try:
        rc = main(
            [
                "train",
                "configs/demo.yaml",
                f"output_dir={run}",
                f"data.train={shapes / 'train'}",
                f"data.val={shapes / 'val'}",
                "data.batch_size=64",
                "fnd.alpha=0.06",
                "fnd.lr=0.1",
                "fnd.start_update=0",
                "fnd.init_threshold=0.5",
                "fnd.start_mask=1",
                "optim.warmup_steps=2",
                "train.epochs=3",
                "train.log_every=2",
                "train.checkpoint_every=0",
                "train.report_to=tensorboard,wandb",
                "eval.tasks=[retrieval]",
                *COMMON,
            ]
        )
    finally:
        mp.undo()
    assert rc == 0
    return run


@pytest.fixture(scope="module")
def ifnd_run(digits, tmp_path_factory):
    """SimCLR + IFND on digits at 16 px: one epoch, clustered at its start, flags at once."""
    run = tmp_path_factory.mktemp("report") / "ifnd"
    rc = main(
        [
            "train",
            "configs/simclr_digits_ifnd.yaml",
            f"output_dir={run}",
            f"data.train={digits / 'train'}",
            f"data.val={digits / 'val'}",
            "data.image_size=16",
            "train.epochs=1",
            "fnd.start_update=0",
            "fnd.start_mask=0",
            "fnd.accept_start=0.5",
            "fnd.num_clusters=[10,20]",
            "train.checkpoint_every=0",
            "train.report_to=none",
            "eval.at_end=false",
            *COMMON,
        ]
    )
    assert rc == 0
    return run


class Anchors(HTMLParser):
    """``{(type, anchor index): [flagged indices]}`` and the section ids of a report page."""

    def __init__(self) -> None:
        super().__init__()
        self.flags: dict[tuple[str, int], list[int]] = {}
        self.sections: list[str] = []

    def handle_starttag(self, tag, attrs):
        a = dict(attrs)
        if tag == "section":
            self.sections.append(a["id"])
        if "data-anchor" in a:
            ids = [int(x) for x in a["data-flagged"].split()]
            self.flags[(a["data-type"], int(a["data-anchor"]))] = ids


def parse(path: Path) -> Anchors:
    p = Anchors()
    p.feed(path.read_text())
    return p


def objective_flags(scores, mode: str) -> dict[str, torch.Tensor]:
    """The flags the run's objective computes for the whole encoded split as one batch, with
    the detector's state as the checkpoint holds it (GloFND's offset as trained, not
    re-estimated from this input: ``DetectionInput.inference``)."""
    import dataclasses

    from clipfnd.state.files import load_detector_state

    cfg = from_dict(scores.ckpt.config)
    tables = read_tables(scores.ckpt)
    obj = OBJECTIVES[mode](cfg, tables, has_labels=True)
    load_tables(tables, scores.ckpt.path)
    load_detector_state(obj.detector, scores.ckpt.path, scores.ckpt.step or 0)
    seen = {}
    detect = obj.detector.detect

    def spy(inp):
        found = detect(dataclasses.replace(inp, inference=True))
        seen.update({t: f for t, f in found.flags.items() if f is not None})
        return found

    obj.detector.detect = spy
    index = torch.tensor([s.index for s in scores.samples])
    label = torch.tensor([s.label for s in scores.samples])
    f = scores.features
    if mode == "clip":
        obj(f["img"], f["txt"], torch.tensor(14.0), index, label, scores.epoch)
        return seen
    obj(torch.cat([f["view"], f["view"]]), torch.tensor(10.0), index, label, scores.epoch)
    n = index.numel()
    return {"view": seen["view"][:n, :n]}  # view 1 rows, view 1 columns


def check_flags_match(page: Path, scores, mode: str) -> int:
    shown = parse(page).flags
    assert shown
    expected = objective_flags(scores, mode)
    by_index = {s.index: s.row for s in scores.samples}
    total = 0
    for (t, anchor), flagged in shown.items():
        row = by_index[anchor]
        want = sorted(
            scores.samples[j].index for j in expected[t][row].nonzero().squeeze(1).tolist()
        )
        assert sorted(flagged) == want, (t, anchor)
        total += len(flagged)
    return total


def test_the_run_writes_plots_and_trackers(clip_run):
    index = json.loads((clip_run / "plots" / "index.json").read_text())
    for name in ("loss.png", "thresholds.png", "flagged.png", "detection.png", "data.png"):
        assert name in index
        with Image.open(clip_run / "plots" / name) as im:
            im.verify()
    assert index["thresholds.png"] == ["thresholds (img anchors)", "thresholds (txt anchors)"]
    assert list((clip_run / "tensorboard").rglob("events.out.tfevents.*"))
    offline = list((clip_run / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and list(offline[0].glob("run-*.wandb"))


def test_report_of_a_clip_run(clip_run, tmp_path):
    out = tmp_path / "r.html"
    path, scores = write_report(clip_run, out, max_anchors=64, progress=False, show=64)
    assert path == out and scores.detector == "glofnd" and not scores.notes
    page = parse(out)
    assert page.sections == ["run", "flags", "thresholds", "per-anchor", "per-label", "plots"]
    assert len(page.flags) == 128  # 64 anchors, as image and as caption anchors
    # per-anchor calibration: each anchor's share is what the detector itself flags for it
    # against every encoded sample (its flags, above), over alpha
    n = len(scores.samples)
    for t, m in scores.per_anchor.items():
        by_row = {a.row: len(a.flagged) for a in scores.flags[t]}
        want = torch.tensor(
            [by_row[r] / (n - 1) / scores.alpha for r in scores.per_anchor_rows],
            dtype=torch.float64,
        )
        torch.testing.assert_close(m.ratio, want)
        # one global threshold flags the same total, less the similarities tied with it
        # (captions repeat here, so do their similarities)
        total, global_total = float(m.ratio.sum()), float(m.global_ratio.sum())
        assert 0.95 * total <= global_total <= total + 1e-9
    numbers = summary_json(scores)
    assert set(numbers["per_anchor"]) == {"img", "txt"}
    assert numbers["per_anchor"]["img"]["anchors"] == 64
    assert 0 <= numbers["per_anchor"]["txt"]["within"] <= 1
    assert numbers["detection"]["right"] == sum(c[0] for c in scores.per_label.values())
    assert check_flags_match(out, scores, "clip") > 0
    text = out.read_text()
    assert "http://" not in text and "https://" not in text and "<script" not in text
    assert text.count("data:image/png;base64,") > 100
    # per label: right + missed = every same-label negative of the scored anchors
    same = sum(a.same_label for fl in scores.flags.values() for a in fl)
    assert sum(c[0] + c[2] for c in scores.per_label.values()) == same
    high, low, lam = scores.confident["img"]
    assert lam[high[0].row] >= lam[low[0].row]


def test_report_of_an_ifnd_run(ifnd_run, tmp_path):
    out = tmp_path / "r.html"
    _, scores = write_report(ifnd_run, out, max_anchors=48, progress=False, show=48)
    page = parse(out)
    assert page.sections == [
        "run",
        "flags",
        "thresholds",
        "per-anchor",
        "per-label",
        "clusters",
        "plots",
    ]
    assert scores.clusters and scores.clusters[0]["size"] >= scores.clusters[-1]["size"]
    assert check_flags_match(out, scores, "simclr") > 0


def test_report_on_another_split_uses_the_median_threshold(clip_run, shapes, tmp_path):
    out = tmp_path / "val.html"
    _, scores = write_report(
        clip_run, out, data=str(shapes / "val"), max_anchors=16, progress=False
    )
    assert not scores.is_training and "not the run's training data" in scores.notes[0]
    learned = scores.thresholds["img"]
    for a in scores.flags["img"]:
        assert a.threshold == pytest.approx(float(learned.median()))


@pytest.mark.parametrize(
    "args,message",
    [
        (["--checkpoint", "999"], "step_00000999 does not exist"),
        (["--out", "/nonexistent/dir/r.html"], "/nonexistent/dir does not exist"),
        (["--data", "/nonexistent/shards"], "no such file or folder"),
        (["--max-anchors", "0"], "--max-anchors must be >= 1"),
    ],
)
def test_report_errors_are_one_line(clip_run, capsys, args, message):
    assert main(["report", str(clip_run), "--no-progress", *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0] and "Traceback" not in err[0]


def test_report_of_a_folder_without_checkpoints(tmp_path, capsys):
    assert main(["report", str(tmp_path), "--no-progress"]) == 2
    assert "no checkpoint in" in capsys.readouterr().err


CHECK = """<script>
window.addEventListener('load', () => {
  const imgs = [...document.images];
  const broken = imgs.filter(i => !(i.complete && i.naturalWidth > 0)).length;
  document.title = `loaded: ${imgs.length} images, ${broken} broken, ${window.__errors || 0} errors`;
});
window.addEventListener('error', () => { window.__errors = (window.__errors || 0) + 1; }, true);
</script>"""


def _chromium() -> str | None:
    return shutil.which("chromium") or shutil.which("chromium-browser")


@pytest.mark.skipif(_chromium() is None, reason="no chromium (.ci/run installs Debian's)")
def test_report_renders_in_headless_chromium(clip_run, tmp_path):
    page = tmp_path / "r.html"
    write_report(clip_run, page, max_anchors=32, progress=False)
    probe = tmp_path / "probe.html"  # the page plus a script that counts broken images
    probe.write_text(page.read_text().replace("<head>", "<head>" + CHECK, 1))
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars"]
    dom = subprocess.run(
        [_chromium(), *flags, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
        capture_output=True,
        text=True,
        timeout=120,
    )
    title = re.search(r"<title>(.*?)</title>", dom.stdout)
    assert title, dom.stderr[-2000:]
    m = re.fullmatch(r"loaded: (\d+) images, 0 broken, 0 errors", title.group(1))
    assert m and int(m.group(1)) > 50, title.group(1)
    shot = tmp_path / "shot.png"
    subprocess.run(
        [_chromium(), *flags, "--window-size=1200,1600", f"--screenshot={shot}", page.as_uri()],
        capture_output=True,
        timeout=120,
        check=True,
    )
    a = np.asarray(Image.open(shot).convert("RGB"))
    assert a.shape[:2] == (1600, 1200)
    assert (a.min(axis=2) < 200).mean() > 0.05  # not a blank page: text and thumbnails
    assert len(np.unique(a.reshape(-1, 3), axis=0)) > 200  # images, not only text
