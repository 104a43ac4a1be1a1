"""The report as one self-contained HTML file: images inlined as PNG data URIs, one style
sheet, no script and nothing fetched from the network.

Machine-readable marks (for tests and scripts): every section has an ``id`` (``run``,
``plots``, ``flags``, ``thresholds``, ``per-label``, ``clusters``); every anchor card carries
``data-anchor`` (its dataset index), ``data-type`` (img | txt | view) and ``data-flagged``
(the dataset indices of *all* the negatives flagged for it, not only those shown).
"""

from __future__ import annotations

import base64
import html
import io
import math
from pathlib import Path

from PIL import Image

from .. import plots
from ..fnd.per_anchor import BAND
from .scoring import AnchorFlags, Sample, Scores

THUMB = 72
TYPE_NAMES = {
    "img": "image anchors (flagged: other samples' captions)",
    "txt": "caption anchors (flagged: other samples' images)",
    "view": "image anchors (flagged: other images)",
}

CSS = """
body { font-family: system-ui, -apple-system, Segoe UI, Roboto, sans-serif; margin: 24px;
       color: #1b1f24; background: #fff; max-width: 1400px; }
h1 { font-size: 22px; margin-bottom: 4px; } h2 { font-size: 18px; margin-top: 32px;
     border-bottom: 1px solid #d0d7de; padding-bottom: 4px; } h3 { font-size: 15px; }
table.kv td { padding: 2px 12px 2px 0; vertical-align: top; } table.kv td:first-child { color: #57606a; }
.note { background: #fff8c5; border: 1px solid #d4a72c; padding: 8px 12px; margin: 8px 0; }
.plots { display: flex; flex-wrap: wrap; gap: 8px; } .plots h2 { flex-basis: 100%; }
.plots figure { margin: 0; } .plots img { max-width: 100%; border: 1px solid #eee; }
.anchor { border: 1px solid #d0d7de; border-radius: 6px; padding: 8px; margin: 10px 0;
          display: flex; gap: 14px; align-items: flex-start; }
.anchor .self { width: 170px; flex: none; } .row { display: flex; flex-wrap: wrap; gap: 8px; }
.card { width: 110px; font-size: 11px; } .card img, .self img { image-rendering: pixelated;
        width: 72px; height: 72px; object-fit: contain; background: #f6f8fa; display: block; }
.card .cap, .self .cap { overflow-wrap: anywhere; } .sim { color: #57606a; }
.ok { color: #1a7f37; font-weight: 600; } .bad { color: #cf222e; font-weight: 600; }
.near { opacity: 0.55; } .lbl { color: #8250df; }
table.grid { border-collapse: collapse; font-size: 13px; }
table.grid th, table.grid td { border: 1px solid #d0d7de; padding: 3px 8px; text-align: right; }
table.grid th:first-child, table.grid td:first-child { text-align: left; }
.muted { color: #57606a; font-size: 13px; }
"""


def data_uri(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode("ascii")


class Thumbs:
    """Thumbnails of samples, decoded once each."""

    def __init__(self) -> None:
        self._cache: dict[int, str] = {}

    def __call__(self, s: Sample) -> str:
        if s.row not in self._cache:
            try:
                im = s.item.load_image()
            except (OSError, ValueError):
                im = Image.new("RGB", (THUMB, THUMB), (200, 200, 200))
            if max(im.size) > THUMB:
                im.thumbnail((THUMB, THUMB))
            buf = io.BytesIO()
            im.save(buf, format="PNG")
            self._cache[s.row] = data_uri(buf.getvalue())
        return self._cache[s.row]


def _esc(x: object) -> str:
    return html.escape(str(x), quote=True)


def _label(scores: Scores, label: int) -> str:
    if label < 0:
        return ""
    names = scores.classnames
    return names[label] if names and 0 <= label < len(names) else str(label)


def _ident(s: Sample) -> int:
    return s.index if s.index >= 0 else s.row


def _card(scores: Scores, thumbs: Thumbs, s: Sample, extra: str = "", cls: str = "card") -> str:
    cap = f'<div class="cap">{_esc(s.caption)}</div>' if s.caption else ""
    lab = _label(scores, s.label)
    lab_html = f'<div class="lbl">{_esc(lab)}</div>' if lab else ""
    return (
        f'<div class="{cls}" data-index="{_ident(s)}"><img alt="sample {_ident(s)}" '
        f'src="{thumbs(s)}">{cap}{lab_html}<div class="sim">#{_ident(s)} {extra}</div></div>'
    )


def _anchor(scores: Scores, thumbs: Thumbs, a: AnchorFlags, shown: int) -> str:
    me = scores.samples[a.row]
    facts = []
    if a.threshold is not None:
        facts.append(f"threshold &lambda; = {a.threshold:.3f}")
    if a.positive is not None:
        facts.append(f"own pair {a.positive:.3f}")
    facts.append(f"{len(a.flagged)} flagged")
    if a.same_label >= 0:
        facts.append(f"{a.same_label} share its label")
    cards = []
    for j, sim in a.flagged[:shown]:
        other = scores.samples[j]
        mark = ""
        if me.label >= 0 and other.label >= 0:
            ok = other.label == me.label
            mark = f'<span class="{"ok" if ok else "bad"}">{"&#10003; same" if ok else "&#10007; other"}</span>'
        cards.append(_card(scores, thumbs, other, f"sim {sim:.3f} {mark}"))
    more = len(a.flagged) - shown
    if more > 0:
        cards.append(f'<div class="card muted">and {more} more</div>')
    near = "".join(
        _card(scores, thumbs, scores.samples[j], f"sim {sim:.3f} (not flagged)", "card near")
        for j, sim in a.nearest
    )
    flagged_ids = " ".join(str(_ident(scores.samples[j])) for j, _ in a.flagged)
    return (
        f'<div class="anchor" data-anchor="{_ident(me)}" data-type="{a.anchor_type}" '
        f'data-flagged="{flagged_ids}">'
        f'<div class="self">{_card(scores, thumbs, me, "", "card")}'
        f'<div class="muted">{" &middot; ".join(facts)}</div></div>'
        f'<div><div class="row">{"".join(cards) or "<span class=muted>nothing flagged</span>"}</div>'
        f'<div class="muted" style="margin-top:6px">most similar negatives not flagged:</div>'
        f'<div class="row">{near}</div></div></div>'
    )


def _pick(flags: list[AnchorFlags], n: int) -> list[AnchorFlags]:
    """Anchors to show: those with flags first (in sampling order), then the others."""
    with_flags = [a for a in flags if a.flagged]
    return (with_flags + [a for a in flags if not a.flagged])[:n]


def _histogram(values, title: str) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5, 3), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.hist(values.numpy(), bins=40, color=plots.TAB[0])
    ax.set_title(title, fontsize=10)
    ax.set_xlabel("threshold (cosine similarity)")
    ax.set_ylabel("samples")
    ax.grid(alpha=0.3)
    return plots.png_bytes(fig)


def _ratio_histogram(scores: Scores, t: str) -> bytes:
    """Each scored anchor's own flagged share over alpha (log scale), under its learned
    threshold and under one global threshold flagging the same total; shaded: 0.5-2 x."""
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    m = scores.per_anchor[t]
    floor = 1.0 / 64
    bins = np.geomspace(floor, 64, 37)
    fig = Figure(figsize=(6, 3), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.subplots()
    ax.axvspan(BAND[0], BAND[1], color="0.9", zorder=0)
    for values, label, colour in (
        (m.ratio, f"learned thresholds ({m.within:.0%} within)", plots.TAB[0]),
        (m.global_ratio, f"one global threshold ({m.global_within:.0%} within)", plots.TAB[1]),
    ):
        v = np.clip(values.numpy(), floor, 64)  # none flagged: drawn at the left edge
        ax.hist(v, bins=bins, histtype="step", linewidth=1.6, color=colour, label=label)
    ax.set_xscale("log")
    ax.set_xlabel("anchor's own flagged share / alpha (left edge: none flagged)")
    ax.set_ylabel("anchors")
    ax.set_title(f"per-anchor calibration, {t} anchors", fontsize=10)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    return plots.png_bytes(fig)


def _per_anchor_section(scores: Scores, thumbs: Thumbs, shown: int = 6) -> list[str]:
    parts = ['<section id="per-anchor"><h2>Per-anchor calibration</h2>']
    if not scores.per_anchor:
        parts.append(
            f'<p class="muted">The detector of this run ({_esc(scores.detector)}) learns no '
            "per-anchor thresholds.</p></section>"
        )
        return parts
    parts.append(
        f"<p class='muted'>Each of the {len(scores.per_anchor_rows)} scored anchors against "
        f"every encoded sample: the share of its own negatives above its threshold, over "
        f"fnd.alpha={scores.alpha:g}. Within {BAND[0]:g}-{BAND[1]:g} x counts as calibrated. "
        "The counterfactual is one global threshold that flags the same total: learned "
        "per-sample thresholds earn their keep by the difference. docs/methods.md, "
        '"Per-anchor calibration".</p>'
        "<table class='grid'><tr><th>anchors</th><th>within 0.5-2 x alpha</th>"
        "<th>same, one global threshold</th><th>median share / alpha</th>"
        "<th>median |threshold - own quantile|</th></tr>"
    )
    for t, m in scores.per_anchor.items():
        parts.append(
            f"<tr><td>{_esc(TYPE_NAMES.get(t, t))}</td><td>{m.within:.3f}</td>"
            f"<td>{m.global_within:.3f}</td><td>{float(m.ratio.median()):.2f}</td>"
            f"<td>{m.median_gap:.4f}</td></tr>"
        )
    parts.append("</table>")
    for t, m in scores.per_anchor.items():
        parts.append(
            f'<figure><img alt="per-anchor calibration ({t})" '
            f'src="{data_uri(_ratio_histogram(scores, t))}"></figure>'
        )
        off = sorted(
            range(len(scores.per_anchor_rows)),
            key=lambda i: -abs(math.log2(max(float(m.ratio[i]), 1e-3))),
        )[:shown]
        cards = "".join(
            _card(
                scores,
                thumbs,
                scores.samples[scores.per_anchor_rows[i]],
                f"{float(m.ratio[i]):.2f} x alpha; &theta; - q {float(m.gap[i]):+.3f}",
            )
            for i in off
        )
        parts.append(f"<h3>{t}: the anchors furthest off</h3><div class='row'>{cards}</div>")
    parts.append("</section>")
    return parts


def summary_json(scores: Scores) -> dict:
    """The report's numbers (``clipfnd report --json``)."""
    out: dict = {
        "checkpoint": str(scores.ckpt.path),
        "step": scores.ckpt.step,
        "data": scores.data_path,
        "is_training_data": scores.is_training,
        "detector": scores.detector,
        "samples": len(scores.samples),
        "mask_start_step": scores.mask_start_step,
    }
    if scores.per_anchor:
        out["alpha"] = scores.alpha
        out["per_anchor"] = {
            t: {
                "anchors": int(m.ratio.numel()),
                "negatives_per_anchor": m.negatives,
                "within": m.within,
                "within_global": m.global_within,
                "median_ratio": float(m.ratio.median()),
                "median_abs_gap": m.median_gap,
                "global_threshold": m.global_threshold,
                "band": list(BAND),
            }
            for t, m in scores.per_anchor.items()
        }
    if scores.per_label:
        tp = sum(c[0] for c in scores.per_label.values())
        fp = sum(c[1] for c in scores.per_label.values())
        fn = sum(c[2] for c in scores.per_label.values())
        out["detection"] = {
            "right": tp,
            "wrong": fp,
            "missed": fn,
            "precision": tp / (tp + fp) if tp + fp else None,
            "recall": tp / (tp + fn) if tp + fn else None,
        }
    return out


def _ratio(a: int, b: int) -> str:
    return f"{a / b:.3f}" if b else "&ndash;"


def render(scores: Scores, run_dir: Path, shown_anchors: int = 12, shown_flags: int = 8) -> str:
    """The whole page."""
    thumbs = Thumbs()
    cfg, ck = scores.cfg, scores.ckpt
    n_anchors = len(next(iter(scores.flags.values()), []))
    parts = [
        "<!DOCTYPE html><html lang=en><head><meta charset=utf-8>",
        f"<title>clipfnd report: {_esc(run_dir.name)}</title><style>{CSS}</style></head><body>",
        f"<h1>What the detector found: {_esc(run_dir.name)}</h1>",
        '<section id="run"><table class="kv">',
    ]
    facts = [
        ("run", run_dir),
        ("checkpoint", f"{ck.path.name} (step {ck.step}, epoch {ck.epoch})"),
        ("mode, model", f"{cfg.mode}, {cfg.model.name}"),
        ("method, detector", f"{cfg.loss.name}, {scores.detector}"),
        (
            "data",
            f"{scores.data_path} ({'the training data' if scores.is_training else 'not the training data'})",
        ),
        (
            "scored",
            f"{n_anchors} anchors against {len(scores.samples)} samples"
            + (f" ({scores.skipped} left out)" if scores.skipped else ""),
        ),
        ("time", f"{scores.seconds.get('total', 0):.1f} s to encode and score"),
    ]
    if scores.detector == "glofnd":
        facts.append(("fnd.alpha", f"{cfg.fnd.alpha} (share of the data above each threshold)"))
    if scores.detector != "none":
        started = scores.mask_start_step
        facts.append(
            (
                "masking",
                f"from step {started} (fnd.start_mask={cfg.fnd.start_mask})"
                if started is not None
                else f"not started by this checkpoint (fnd.start_mask={cfg.fnd.start_mask})",
            )
        )
    parts += [f"<tr><td>{_esc(k)}</td><td>{_esc(v)}</td></tr>" for k, v in facts]
    parts.append("</table>")
    parts += [f'<div class="note">{_esc(n)}</div>' for n in scores.notes]
    parts.append("</section>")

    # flags
    parts.append('<section id="flags"><h2>Flagged negatives</h2>')
    tp, fp, fn = (sum(c[i] for c in scores.per_label.values()) for i in range(3))
    flagged_all = sum(len(a.flagged) for fl in scores.flags.values() for a in fl)
    rows_all = sum(len(fl) for fl in scores.flags.values())
    summary = (
        f"{flagged_all} negatives flagged over {rows_all} anchor rows "
        f"({flagged_all / max(rows_all, 1):.1f} per anchor, "
        f"{flagged_all / max(rows_all * (len(scores.samples) - 1), 1):.4f} of all negatives)"
    )
    if scores.per_label:
        summary += (
            f"; against the labels: precision {_ratio(tp, tp + fp)}, recall {_ratio(tp, tp + fn)}"
        )
    parts.append(
        f"<p>{summary}. Each anchor below shows its flagged negatives, most similar "
        "first, and the most similar negatives its detector left in.</p>"
        "<p class=muted>Scored against the whole split encoded here: every anchor against "
        "every other sample, with the thresholds as trained (GloFND's offset included). "
        "During training, flags are counted within each global batch: the flagged share and "
        "precision of the training plots below are batch figures.</p>"
    )
    for t, fl in scores.flags.items():
        parts.append(f"<h3>{_esc(TYPE_NAMES.get(t, t))}</h3>")
        parts += [_anchor(scores, thumbs, a, shown_flags) for a in _pick(fl, shown_anchors)]
    parts.append("</section>")

    # thresholds
    parts.append('<section id="thresholds"><h2>Thresholds</h2>')
    if not scores.thresholds:
        parts.append(
            f'<p class="muted">The detector of this run ({_esc(scores.detector)}) learns no '
            "thresholds.</p>"
        )
    for t, values in scores.thresholds.items():
        if values.numel() == 0:
            parts.append(f'<p class="muted">No {t} threshold has been updated yet.</p>')
            continue
        parts.append(
            f'<figure><img alt="threshold histogram ({t})" '
            f'src="{data_uri(_histogram(values, f"learned thresholds, {t} anchors ({values.numel()} samples)"))}"></figure>'
        )
        if t in scores.confident:
            high, low, lam = scores.confident[t]
            for title, group in (
                ("most confident (highest thresholds)", high),
                ("least confident (lowest thresholds)", low),
            ):
                cards = "".join(
                    _card(scores, thumbs, s, f"&lambda; {float(lam[s.row]):.3f}") for s in group
                )
                parts.append(f"<h3>{t}: {title}</h3><div class='row'>{cards}</div>")
    parts.append("</section>")

    parts += _per_anchor_section(scores, thumbs)

    # per label
    parts.append('<section id="per-label"><h2>Detection per label</h2>')
    if not scores.per_label:
        parts.append('<p class="muted">The data has no labels: nothing to check flags against.</p>')
    else:
        parts.append(
            "<p class='muted'>Over the scored anchors of each label: flagged negatives that share "
            "it (right), that do not (wrong), and same-label negatives left in (missed). Sorted by "
            "recall, lowest first: the concepts the detector confuses or misses come first.</p>"
            "<table class='grid'><tr><th>label</th><th>right</th><th>wrong</th><th>missed</th>"
            "<th>precision</th><th>recall</th></tr>"
        )

        def recall(c: list[int]) -> float:
            return c[0] / (c[0] + c[2]) if c[0] + c[2] else 1.0

        for lab, c in sorted(scores.per_label.items(), key=lambda kv: (recall(kv[1]), kv[0])):
            parts.append(
                f"<tr><td>{_esc(_label(scores, lab))}</td><td>{c[0]}</td><td>{c[1]}</td>"
                f"<td>{c[2]}</td><td>{_ratio(c[0], c[0] + c[1])}</td>"
                f"<td>{_ratio(c[0], c[0] + c[2])}</td></tr>"
            )
        parts.append("</table>")
    parts.append("</section>")

    # IFND clusters
    if scores.clusters:
        parts.append('<section id="clusters"><h2>IFND clusters</h2>')
        parts.append(
            "<p class='muted'>The largest clusters of the coarsest granularity among the scored "
            "samples, members by confidence (similarity to the centroid); faded: not accepted "
            "yet (no pseudo-label, so nothing is flagged for them).</p>"
        )
        for c in scores.clusters:
            purity = (
                f", {c['purity']:.0%} labelled {_esc(_label(scores, c['majority']))}"
                if c["purity"] is not None
                else ""
            )
            parts.append(
                f"<h3>cluster {c['cluster']} of {c['granularity']}: {c['size']} samples, "
                f"{c['accepted']} accepted{purity}</h3>"
            )
            cards = "".join(
                _card(scores, thumbs, s, f"conf {conf:.3f}", "card" if ok else "card near")
                for s, ok, conf in c["members"]
            )
            parts.append(f"<div class='row'>{cards}</div>")
        parts.append("</section>")
    # plots of the run's metrics
    parts.append('<section id="plots" class="plots"><h2>Training (RUN/plots)</h2>')
    drawn = plots.panels(plots.read_metrics(run_dir / "metrics.jsonl"))
    if not drawn:
        parts.append('<p class="muted">metrics.jsonl holds no step yet.</p>')
    for name, ps in drawn.items():
        titles = ", ".join(p.title for p in ps)
        parts.append(
            f'<figure data-plot="{name}"><img alt="{_esc(titles)}" '
            f'src="{data_uri(plots.png_bytes(plots.draw(ps)))}"></figure>'
        )
    parts.append("</section>")

    parts.append("</body></html>")
    return "\n".join(parts)
