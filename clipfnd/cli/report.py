"""``clipfnd report RUN``: the HTML page of what a run's detector found (docs/report.md)."""

from __future__ import annotations

import argparse


def cmd_report(a: argparse.Namespace) -> int:
    from data_pipelines.offline import stay_offline

    from ..report import write_report

    stay_offline()
    for name in ("max_anchors", "max_samples", "batch_size", "show"):
        if getattr(a, name) < 1:
            from ..errors import UserError

            raise UserError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if a.json:
        from pathlib import Path

        from ..errors import UserError

        folder = Path(a.json).parent
        if not folder.is_dir():
            raise UserError(f"--json {a.json}: the folder {folder} does not exist")
    path, scores = write_report(
        a.run,
        a.out,
        show=a.show,
        checkpoint=a.checkpoint,
        data=a.data,
        max_samples=a.max_samples,
        max_anchors=a.max_anchors,
        batch_size=a.batch_size,
        seed=a.seed,
        device=a.device,
        progress=not a.no_progress,
    )
    if a.json:
        import json
        from pathlib import Path

        from ..report.page import summary_json

        Path(a.json).write_text(json.dumps(summary_json(scores), indent=2) + "\n")
    secs = scores.seconds
    print(
        f"report: {path} ({len(scores.samples)} samples encoded in {secs['encode']:.1f} s, "
        f"flags in {secs['flags']:.1f} s, page in {secs['render']:.1f} s)",
        flush=True,
    )
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    r = sub.add_parser(
        "report",
        help="an HTML page of what a run's detector found (flags, thresholds, plots)",
        description="Write one self-contained HTML file: the run's plots; for a sample of "
        "anchors, the negatives its detector flags with the checkpoint's state (thumbnails, "
        "captions, similarities, and whether each flag is right when labels exist); the "
        "threshold histogram with the most and least confident anchors; detection precision "
        "and recall per label; IFND's clusters. See docs/report.md.",
    )
    r.add_argument("run", help="the run folder (RUN, with metrics.jsonl and checkpoints/)")
    r.add_argument(
        "--checkpoint",
        default=None,
        help="a step of the run (e.g. 256) or a checkpoint folder (default: the newest)",
    )
    r.add_argument(
        "--data",
        default=None,
        help="the split to look at: any layout `clipfnd eval` reads (default: the run's "
        "data.train; another split uses the median threshold, see docs/report.md)",
    )
    r.add_argument("--out", default=None, help="the HTML file (default: RUN/report.html)")
    r.add_argument(
        "--max-anchors",
        type=int,
        default=256,
        help="anchors scored against every encoded sample (bounds time: anchors x samples)",
    )
    r.add_argument(
        "--max-samples",
        type=int,
        default=10000,
        help="samples of the split encoded, in dataset order (bounds memory and time)",
    )
    r.add_argument("--show", type=int, default=12, help="anchors shown per anchor type")
    r.add_argument("--batch-size", type=int, default=256)
    r.add_argument("--seed", type=int, default=0, help="which anchors are drawn")
    r.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    r.add_argument("--no-progress", action="store_true", help="no progress bars")
    r.add_argument(
        "--json",
        default=None,
        metavar="PATH",
        help="also write the report's numbers (per-anchor calibration, detection) as JSON",
    )
    r.set_defaults(func=cmd_report)
