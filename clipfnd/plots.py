"""Plots of a run, drawn from ``RUN/metrics.jsonl``: PNG files in ``RUN/plots/``.

One file per subject, each with one or more panels; ``RUN/plots/index.json`` lists every file
with the titles of its panels. A subject whose metrics the run never wrote (thresholds without
GloFND, precision and recall without labels) has no file.

===================  ======================================================================
``loss.png``         training loss; learning rate (and the temperature's, when it has one)
``temperature.png``  the temperature ``tau = 1 / logit_scale``
``thresholds.png``   GloFND's threshold quantiles (10 %, 50 %, 90 %), a panel per anchor type
``flagged.png``      the share of negatives flagged; anchors with every negative flagged
``calibration.png``  GloFND: negatives flagged / fnd.alpha (the calibrated band shaded) and each
                     threshold less its anchor's batch quantile
``detection.png``    detection precision and recall against the labels
``data.png``         samples skipped as bad; per epoch: used, skipped, not used
``eval.png``         the evaluation metrics over training (R@1, top-1)
===================  ======================================================================

The step at which the detector started removing flagged negatives is a dashed vertical line
on the detector's panels.

Matplotlib's object interface and its Agg canvas only (no ``pyplot``, no display), so the
trainer can draw from a background thread without touching any global figure state.
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
import threading
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

INDEX = "index.json"
TAB = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The whole JSON lines of ``metrics.jsonl`` (a line cut short by a kill is left out)."""
    out = []
    p = Path(path)
    if not p.is_file():
        return out
    for line in p.read_text(errors="replace").splitlines():
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int):
            out.append(rec)
    return out


def series(records: Iterable[dict[str, Any]], key: str) -> tuple[list[int], list[float]]:
    """``(steps, values)`` of ``key`` over the lines that hold a finite number for it."""
    xs, ys = [], []
    for r in records:
        v = r.get(key)
        if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v):
            xs.append(r["step"])
            ys.append(float(v))
    return xs, ys


@dataclass
class Panel:
    title: str
    lines: list[tuple[str, list[int], list[float]]] = field(default_factory=list)
    ylabel: str = ""
    logy: bool = False
    band: tuple[list[int], list[float], list[float]] | None = None  # shaded (x, low, high)
    bars: tuple[list[str], dict[str, list[float]]] | None = None  # (categories, {name: values})
    hband: tuple[float, float] | None = None  # a shaded horizontal band (low, high)
    vlines: list[tuple[str, float]] = field(default_factory=list)  # (label, step)

    def empty(self) -> bool:
        return not (any(xs for _, xs, _ in self.lines) or self.bars)


def panels(records: list[dict[str, Any]]) -> dict[str, list[Panel]]:
    """Every plot the metrics allow: ``{file stem: panels}`` (subjects without data left out)."""
    steps = [r for r in records if "loss" in r]  # the training step lines
    out: dict[str, list[Panel]] = {}

    lr = Panel("learning rate", [("lr", *series(steps, "lr"))], ylabel="lr")
    if any("tau_lr" in r for r in steps):
        lr.lines.append(("temperature lr", *series(steps, "tau_lr")))
    loss = Panel("training loss", [("loss", *series(steps, "loss"))], ylabel="loss")
    loss.logy = bool(loss.lines[0][2]) and min(loss.lines[0][2]) > 0
    out["loss"] = [loss, lr]

    xs, scale = series(steps, "logit_scale")
    out["temperature"] = [
        Panel("temperature", [("tau = 1/logit_scale", xs, [1 / s for s in scale])], ylabel="tau")
    ]

    anchor_types = sorted(
        {k.split("_")[1] for r in steps for k in r if k.startswith("fnd/lambda_")}
    )
    thr = []
    for t in anchor_types:
        p = Panel(f"thresholds ({t} anchors)", ylabel="cosine similarity")
        for q in ("q10", "q50", "q90"):
            p.lines.append((q, *series(steps, f"fnd/lambda_{t}_{q}")))
        lo, hi = p.lines[0], p.lines[2]
        if lo[1] == hi[1] and lo[1]:
            p.band = (lo[1], lo[2], hi[2])
        thr.append(p)
    out["thresholds"] = thr

    starts = [r["fnd/mask_start_step"] for r in records if "fnd/mask_start_step" in r]
    start = [("masking starts", starts[-1])] if starts else []
    flagged = Panel("negatives flagged", ylabel="share", vlines=start)
    flagged.lines.append(("flagged share", *series(steps, "fnd/flagged_share")))
    flagged.lines.append(("anchors with all flagged", *series(steps, "fnd/anchors_all_flagged")))
    accepted = Panel("IFND: accepted share", [("accepted", *series(records, "fnd/accepted_share"))])
    out["flagged"] = [p for p in (flagged, accepted) if not p.empty()]

    calibration = Panel("flagged / fnd.alpha (shaded: calibrated)", ylabel="x alpha", vlines=start)
    calibration.lines.append(("flagged / alpha", *series(steps, "fnd/flagged_over_alpha")))
    calibration.hband = (0.75, 4.0 / 3.0)
    gap = Panel("threshold - batch quantile", ylabel="cosine similarity", vlines=start)
    for t in sorted({k.rsplit("_", 1)[1] for r in steps for k in r if "threshold_gap_" in k}):
        gap.lines.append((f"{t} anchors", *series(steps, f"fnd/threshold_gap_{t}")))
    out["calibration"] = [calibration, gap]
    per_anchor = Panel(
        "anchors within 0.5-2 x alpha of their own negatives",
        ylabel="share of anchors",
        vlines=start,
    )
    for t in sorted(
        {
            k.split("_")[1]
            for r in records
            for k in r
            if k.startswith("fnd/anchors_") and k.endswith("_within")
        }
    ):
        per_anchor.lines.append((f"{t} anchors", *series(records, f"fnd/anchors_{t}_within")))
        per_anchor.lines.append(
            (f"{t}, one global threshold", *series(records, f"fnd/anchors_{t}_within_global"))
        )
    if not per_anchor.empty():
        out["calibration"].append(per_anchor)

    det = Panel("detection against labels", ylabel="", vlines=start)
    det.lines.append(("precision", *series(steps, "fnd/precision")))
    det.lines.append(("recall", *series(steps, "fnd/recall")))
    out["detection"] = [det]

    skipped = Panel(
        "samples skipped as bad (so far)", [("skipped", *series(steps, "data/skipped"))]
    )
    epochs = [r for r in records if "data/used" in r]
    per_epoch = None
    if epochs:
        cats = [str(r.get("epoch", i)) for i, r in enumerate(epochs)]
        bars = {
            name: [float(r.get(f"data/{name}", 0) or 0) for r in epochs]
            for name in ("used", "skipped", "not_used")
            if any(f"data/{name}" in r for r in epochs)
        }
        per_epoch = Panel("samples per epoch", ylabel="samples", bars=(cats, bars))
    out["data"] = [p for p in (skipped, per_epoch) if p is not None and not p.empty()]

    evals = [r for r in records if any(k.startswith("val/") for k in r)]
    keys = sorted(
        {
            k
            for r in evals
            for k in r
            if k.startswith("val/") and (k.endswith("R@1") or k.endswith("top1"))
        }
    )
    out["eval"] = [Panel("evaluation", [(k[4:], *series(evals, k)) for k in keys], ylabel="score")]
    kept = {name: [p for p in ps if not p.empty()] for name, ps in out.items()}
    return {name: ps for name, ps in kept.items() if ps}


def draw(panel_list: list[Panel], title: str = ""):
    """A matplotlib ``Figure`` with the panels side by side."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    n = len(panel_list)
    fig = Figure(figsize=(4.2 * n, 3.2), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, n, squeeze=False)[0]
    for ax, p in zip(axes, panel_list):
        if p.bars is not None:
            cats, groups = p.bars
            width = 0.8 / max(len(groups), 1)
            for i, (name, vals) in enumerate(groups.items()):
                pos = [c + (i - (len(groups) - 1) / 2) * width for c in range(len(cats))]
                ax.bar(pos, vals, width=width, label=name.replace("_", " "), color=TAB[i % 8])
            ax.set_xticks(range(len(cats)), cats)
            ax.set_xlabel("epoch")
        else:
            if p.band is not None:
                ax.fill_between(p.band[0], p.band[1], p.band[2], alpha=0.15, color=TAB[0])
            if p.hband is not None:
                ax.axhspan(p.hband[0], p.hband[1], alpha=0.12, color=TAB[2])
            for label, x in p.vlines:
                ax.axvline(x, ls="--", lw=1, color="grey", label=label)
            for i, (label, xs, ys) in enumerate(p.lines):
                if xs:
                    marker = "o" if len(xs) < 20 else None
                    ax.plot(xs, ys, label=label, color=TAB[i % 8], marker=marker, ms=3)
            ax.set_xlabel("step")
            if p.logy:
                ax.set_yscale("log")
        ax.set_title(p.title, fontsize=10)
        if p.ylabel:
            ax.set_ylabel(p.ylabel)
        ax.grid(alpha=0.3)
        if len(p.lines) + len(p.vlines) > 1 or (p.bars and len(p.bars[1]) > 1):
            ax.legend(fontsize=7)
    if title:
        fig.suptitle(title, fontsize=11)
    return fig


def png_bytes(fig) -> bytes:
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_plots(run_dir: str | os.PathLike, out_dir: str | os.PathLike | None = None) -> list[Path]:
    """Draw every plot the run's ``metrics.jsonl`` allows into ``out_dir`` (``RUN/plots``).

    Each file is written next to its final name and renamed into place, so a reader never
    sees half a PNG; ``index.json`` lists ``{file: [panel titles]}``. Returns the files.
    """
    run = Path(run_dir)
    out = Path(out_dir) if out_dir is not None else run / "plots"
    out.mkdir(parents=True, exist_ok=True)
    written, index = [], {}
    for name, ps in panels(read_metrics(run / "metrics.jsonl")).items():
        path = out / f"{name}.png"
        tmp = path.with_suffix(".png.tmp")
        tmp.write_bytes(png_bytes(draw(ps)))
        tmp.replace(path)
        written.append(path)
        index[path.name] = [p.title for p in ps]
    tmp = out / (INDEX + ".tmp")
    tmp.write_text(json.dumps(index, indent=2) + "\n")
    tmp.replace(out / INDEX)
    return written


class PlotWriter:
    """Redraws ``RUN/plots`` in a background thread, so the process that draws (rank 0) does
    not hold up the others: ``request()`` at the end of an epoch returns at once (a request
    made while a drawing runs is served once it ends); ``close()`` draws one last time and
    waits. A plot that fails to draw is a warning, never the end of the run."""

    def __init__(self, run_dir: str | os.PathLike, enabled: bool = True):
        self.run_dir = Path(run_dir)
        self.enabled = enabled
        self._wanted = threading.Event()
        self._stop = False
        self._thread: threading.Thread | None = None
        self.seconds = 0.0  # time spent drawing, all requests together

    def request(self) -> None:
        if not self.enabled:
            return
        self._wanted.set()
        if self._thread is None:
            self._thread = threading.Thread(target=self._serve, name="clipfnd-plots", daemon=True)
            self._thread.start()

    def _serve(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            if self._stop:
                return
            self._draw()

    def _draw(self) -> None:
        import time

        t0 = time.perf_counter()
        try:
            write_plots(self.run_dir)
        except Exception as e:  # noqa: BLE001 - a plot is never worth a run
            log.warning("could not draw the plots in %s: %s", self.run_dir / "plots", e)
        self.seconds += time.perf_counter() - t0

    def close(self) -> None:
        """Draw the final plots (in this thread) once any drawing under way has ended."""
        if not self.enabled:
            return
        if self._thread is not None:
            self._stop = True
            self._wanted.set()
            self._thread.join()
            self._thread = None
        self._draw()
