"""``clipfnd report RUN``: one self-contained HTML page of what a run's detector found.

``scoring`` computes (the checkpoint's model and tables, the split encoded, the flags of the
run's own detector); ``page`` renders. ``write_report`` does both and writes the file.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

from .page import render
from .scoring import ReportError, Scores, score

__all__ = ["ReportError", "Scores", "score", "render", "write_report"]


def write_report(
    run: str | os.PathLike,
    out: str | os.PathLike | None = None,
    *,
    show: int = 12,
    **options,
) -> tuple[Path, Scores]:
    """Score ``run`` (``options``: see ``score``) and write the page to ``out`` (default
    ``RUN/report.html``), atomically. Returns the path and the scores."""
    run_dir = Path(run)
    if not run_dir.is_dir():
        raise ReportError(f"{run_dir} is not a run folder")
    path = Path(out) if out is not None else run_dir / "report.html"
    if path.exists() and path.is_dir():
        raise ReportError(f"--out {path} is a folder; give the HTML file's path")
    if not path.parent.exists():
        raise ReportError(f"--out {path}: the folder {path.parent} does not exist")
    if not os.access(path.parent, os.W_OK):
        raise ReportError(f"--out {path}: {path.parent} is not writable")
    t0 = time.perf_counter()
    scores = score(run_dir, **options)
    run_of_ckpt = scores.ckpt.run_dir or run_dir
    page = render(scores, Path(run_of_ckpt), shown_anchors=show)
    scores.seconds["render"] = time.perf_counter() - t0 - scores.seconds.get("total", 0.0)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(path)
    return path, scores
