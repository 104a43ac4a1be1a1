"""The study that decides GloFND's defaults: threshold rules x alpha x testbeds, paired by seed.

Rules (every one a real ``clipfnd train`` run of the same recipe; flags used from 60 % of
training on, the detector learning from the first step):

- ``none``: plain CLIP;
- ``paper``: GloFND's per-sample rule as the paper writes it (constant start, Adam/SGD on the
  pinball loss, no offset), on the training view;
- ``default``: the calibrated default (only ``fnd.detector`` and ``fnd.alpha`` set): GloFND
  reads the clean view (``fnd.view=clean``);
- ``trainview``: the same on the training view (``fnd.view=train``), the default before the
  clean view;
- ``global``: one threshold for every anchor, the global batch's (1 - alpha) quantile (the
  default's offset over thresholds that never move), on the training view: no per-sample
  information;
- ``oracle``: every same-concept negative removed.

alpha runs over rate/8, rate/4, rate/2 and rate, where rate is the testbed's true
same-concept rate (the share of a sample's negatives that share its concept). After each run,
the final checkpoint's thresholds are read against the final model's un-augmented similarities
over the whole training split (as ``clipfnd report`` does): per-anchor calibration (the share
of anchors flagging within 0.5-2 x alpha of their own negatives, and of one global threshold
flagging the same total), the flags' precision and recall against the labels, and three
candidate precision signals that need no labels:

- ``agreement``: a pair (i, j) flagged from image anchor i and from text anchor i alike
  (Jaccard of the two flag sets);
- ``mutual``: a flag of anchor i on sample j whose reverse (anchor j on sample i, same
  modality) is flagged too (share of flags);
- ``persistence``: a flag of the final checkpoint that the checkpoint of 8 epochs before
  raised too (share of flags).

Each signal's Spearman rank correlation with the true precision is taken over every detector
run of the study, and within each alpha (where alpha cannot carry it).

    python benchmarks/fn_study.py --testbeds fn-testbed --seeds 0 1 2     # runs, saved one by one
    python benchmarks/fn_study.py --testbeds fn-longtail --seeds 0 1 2    # (a second process)
    python benchmarks/fn_study.py --report                                # tables, plots, page
    python benchmarks/fn_study.py --quick                                 # make bench (~2 min)

Runs are saved as they finish under ``--out`` (``runs/bench/fn_study``) and skipped when found
there, so a stopped study goes on where it stopped; a run in progress holds a ``.running`` file
beside its result, so two processes (``--seeds 0 1 2`` and ``--seeds 2 1 0``) share a testbed's
runs (after a killed run, delete its ``.running`` file). ``--report`` gathers them into
``docs/fn_study.json``, ``docs/images/fn_study_*.png`` and its section of ``docs/results.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import statistics
import sys
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from fn_benefit import CONCEPT_KEYS, _figure, mean_sd, testbed, write_section  # noqa: E402

RULES: dict[str, list[str]] = {
    "none": [],
    "paper": ["fnd.detector=glofnd", "fnd.init=constant", "fnd.offset=false", "fnd.view=train"],
    "default": ["fnd.detector=glofnd"],
    "trainview": ["fnd.detector=glofnd", "fnd.view=train"],
    "global": [
        "fnd.detector=glofnd",
        "fnd.view=train",
        "fnd.init=constant",
        "fnd.optimizer=sgd",
        "fnd.lr=1e-9",  # thresholds that do not move (fnd.lr must be > 0)
        "fnd.offset=true",
    ],
    "oracle": ["fnd.detector=oracle"],
}
PER_ALPHA = ("paper", "default", "trainview", "global")  # the rules whose runs depend on alpha
FRACTIONS = (1 / 8, 1 / 4, 1 / 2, 1.0)  # alpha over the testbed's true rate
SIGNALS = ("agreement", "mutual", "persistence")
START = "60%"
BEGIN, END = "<!-- fn_study:begin -->", "<!-- fn_study:end -->"


def tag(frac: float) -> str:
    return "rate" if frac == 1 else f"rate/{round(1 / frac)}"


def recipe(d: Path, out: Path, seed: int, a: argparse.Namespace, alpha: float) -> list[str]:
    """fn_regime.py's shared recipe (later keys win), with what this study changes: one
    process a run, no per-anchor measure while training (it is read after), a checkpoint 8
    epochs before the end kept for the flags' persistence."""
    from fn_regime import recipe as shared

    steps = a.num_train // a.batch
    return [
        *shared(d, out, seed, a.epochs, alpha, START, a.batch),
        "data.num_workers=0",
        "fnd.calibration_bank=0",
        f"train.log_every={max(1, steps // 2)}",
        f"train.checkpoint_every={steps * min(8, a.epochs // 2)}",
        "train.keep_checkpoints=2",
    ]


# --- what a run's flags say -------------------------------------------------------------------
def flags_of(run: Path, step: int | None = None) -> dict:
    """The checkpoint's thresholds (offset included) against its own model's un-augmented
    similarities over the training split: ``s`` (image x text), each modality's thresholds,
    the labels."""
    from clipfnd.checkpoints import final_path, load_checkpoint
    from clipfnd.config import from_dict
    from clipfnd.fnd.per_anchor import flag_thresholds
    from clipfnd.report.scoring import _detector, read_tables
    from clipfnd.state.files import load_detector_state, load_tables
    from clipfnd_eval.layouts import open_dataset
    from clipfnd_eval.samples import collect, encode

    ck = load_checkpoint(final_path(run, step) if step else run)
    cfg = from_dict(ck.config)
    samples, _ = collect(open_dataset(cfg.data.train, default_split="train"), 10**6, True)
    feats, samples, _ = encode(ck, "clip", samples, 256, torch.device("cpu"), False)
    index = torch.tensor([x.index for x in samples])
    tables = read_tables(ck)
    det = _detector(cfg, tables, True)
    load_tables(tables, ck.path)
    load_detector_state(det, ck.path, ck.step or 0)
    thr = {t: flag_thresholds(tables, t, index, det.offsets) for t in ("img", "txt")}
    return {
        "img": feats["img"].double(),
        "txt": feats["txt"].double(),
        "thr": thr,
        "labels": torch.tensor([x.label for x in samples]),
        "index": index,
    }


def flag_sets(f: dict) -> dict[str, torch.Tensor]:
    """Boolean [n, n] flags: ``img`` [i, j], image anchor i flags text j; ``txt`` [i, j], text
    anchor i flags image j (the diagonal, each anchor's positive, never)."""
    s = f["img"] @ f["txt"].T
    eye = torch.eye(len(s), dtype=torch.bool)
    return {
        "img": (s > f["thr"]["img"][:, None]) & ~eye,
        "txt": (s.T > f["thr"]["txt"][:, None]) & ~eye,
    }


def detection(f: dict, flags: dict[str, torch.Tensor], early: dict | None, alpha: float) -> dict:
    from clipfnd.fnd.per_anchor import measure

    same = f["labels"][:, None] == f["labels"][None, :]
    same.fill_diagonal_(False)
    both = flags["img"].sum() + flags["txt"].sum()
    true = (flags["img"] & same).sum() + (flags["txt"] & same).sum()
    out: dict = {
        "precision": float(true / both) if both else None,
        "recall": float(true / (2 * same.sum())),
        "flagged_share": float(both / (2 * same.numel() - 2 * len(same))),
    }
    union = (flags["img"] | flags["txt"]).sum()
    out["agreement"] = float((flags["img"] & flags["txt"]).sum() / union) if union else None
    out["mutual"] = (
        float(
            ((flags["img"] & flags["img"].T).sum() + (flags["txt"] & flags["txt"].T).sum()) / both
        )
        if both
        else None
    )
    if early is not None and both:
        e = flag_sets(early)
        kept = (flags["img"] & e["img"]).sum() + (flags["txt"] & e["txt"]).sum()
        out["persistence"] = float(kept / both)
    n = len(same)
    for t, o in (("img", "txt"), ("txt", "img")):
        m = measure(f[t], f[o], torch.arange(n), f["thr"][t], alpha)
        out[f"per_anchor_{t}"] = m.metrics("")
    return out


def run_one(d: Path, rate: float, rule: str, frac: float, seed: int, a) -> dict:
    from clipfnd.config import load_config
    from clipfnd.train.loop import train

    alpha = rate * frac
    work = Path(a.out) / "work" / f"{d.name}-{rule}-{frac:g}-{seed}"
    cfg = load_config(None, [*recipe(d, work, seed, a, alpha), *RULES[rule]])
    t0 = time.perf_counter()
    summary = train(cfg)
    ev = summary["eval"]
    r: dict = {"rule": rule, "frac": frac, "alpha": alpha, "seed": seed}
    r.update({k: ev[k] for k in CONCEPT_KEYS})
    r["concept_mean"] = statistics.mean(ev[k] for k in CONCEPT_KEYS)
    lines = [json.loads(x) for x in (work / "metrics.jsonl").read_text().splitlines()]
    masked = [x for x in lines if x.get("fnd/masking")]
    for key in ("precision", "recall", "flagged_over_alpha"):
        vals = [x[f"fnd/{key}"] for x in masked if f"fnd/{key}" in x]
        r[f"train_{key}"] = statistics.mean(vals) if vals else None
    if rule in PER_ALPHA:
        final = flags_of(work)
        steps = summary["steps"]
        every = cfg.train.checkpoint_every
        early = flags_of(work, steps - every) if every and steps > every else None
        r.update(detection(final, flag_sets(final), early, alpha))
    r["seconds"] = time.perf_counter() - t0
    shutil.rmtree(work, ignore_errors=True)
    return r


def data(root: Path, name: str, a) -> tuple[Path, float]:
    """The testbed's shards, written once per size (and its true same-concept rate)."""
    marker = root / f"{name}-{a.num_train}.json"
    if marker.exists():
        m = json.loads(marker.read_text())
        return Path(m["dir"]), m["rate"]
    d, rate = testbed(root / f"{a.num_train}", None, a.num_train, a.num_val, name)
    marker.write_text(json.dumps({"dir": str(d), "rate": rate}) + "\n")
    return d, rate


def gather(a) -> None:
    root = Path(a.out)
    torch.set_num_threads(a.threads)
    for name in a.testbeds:
        d, rate = data(root / "data", name, a)
        saved = root / "runs" / name
        saved.mkdir(parents=True, exist_ok=True)
        (saved / "testbed.json").write_text(json.dumps({"rate": rate}) + "\n")
        plan = [
            (rule, frac)
            for rule in RULES
            for frac in (FRACTIONS if rule in PER_ALPHA else (1.0,))
            if frac in a.fractions or rule not in PER_ALPHA
        ]
        for seed in a.seeds:
            for rule, frac in plan:
                path = saved / f"{rule}-{frac:g}-{seed}.json"
                lock = path.with_suffix(".running")  # another process of the study has it
                if path.exists():
                    continue
                try:
                    lock.touch(exist_ok=False)  # atomic: one process takes the run
                except FileExistsError:
                    continue
                try:
                    r = run_one(d, rate, rule, frac, seed, a)
                    path.write_text(json.dumps(r) + "\n")
                finally:
                    lock.unlink()
                pa = r.get("per_anchor_img")
                extra = (
                    f", precision {r['precision']:.3f}, recall {r['recall']:.3f}, within "
                    f"{pa['within']:.2f}/{r['per_anchor_txt']['within']:.2f} (global "
                    f"{pa['within_global']:.2f}/{r['per_anchor_txt']['within_global']:.2f})"
                    if pa and r.get("precision") is not None
                    else ""
                )
                print(
                    f"{name} {rule:8s} alpha {frac:g} x rate, seed {seed}: concept mean "
                    f"{r['concept_mean']:.3f}{extra} ({r['seconds']:.0f} s)",
                    flush=True,
                )


# --- statistics -------------------------------------------------------------------------------
def load_runs(root: Path) -> dict:
    out: dict = {}
    for tb in sorted((root / "runs").iterdir()):
        if not (tb / "testbed.json").exists():
            continue
        runs = [json.loads(p.read_text()) for p in sorted(tb.glob("*-*-*.json"))]
        out[tb.name] = {"rate": json.loads((tb / "testbed.json").read_text())["rate"], "runs": runs}
    return out


def spearman(x: list[float], y: list[float]) -> float:
    from scipy.stats import spearmanr

    if len(x) < 3:
        return float("nan")
    return float(spearmanr(x, y).statistic)


def ms(vals: list, digits: int = 3) -> str:
    vals = [v for v in vals if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not vals:
        return "-"
    m, s = mean_sd(vals)
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def paired(runs: list[dict], rule: str, frac: float, base: str = "none") -> list[float]:
    """Per seed: the arm's concept mean less the baseline's (100 x, points)."""
    b = {r["seed"]: r["concept_mean"] for r in runs if r["rule"] == base}
    return [
        100 * (r["concept_mean"] - b[r["seed"]])
        for r in runs
        if r["rule"] == rule and r["frac"] == frac and r["seed"] in b
    ]


def arm(runs: list[dict], rule: str, frac: float) -> list[dict]:
    return [r for r in runs if r["rule"] == rule and r["frac"] == frac]


def signal_table(study: dict) -> list[tuple[str, float, list[float], int]]:
    """Each signal: Spearman with the true precision over every detector run, and within each
    alpha (over rules, testbeds, seeds)."""
    rows = []
    det = [r for tb in study.values() for r in tb["runs"] if r.get("precision") is not None]
    for sig in SIGNALS:
        have = [r for r in det if r.get(sig) is not None]
        overall = spearman([r[sig] for r in have], [r["precision"] for r in have])
        within = []
        for frac in FRACTIONS:
            sub = [r for r in have if r["frac"] == frac]
            within.append(spearman([r[sig] for r in sub], [r["precision"] for r in sub]))
        rows.append((sig, overall, within, len(have)))
    return rows


# --- the page ---------------------------------------------------------------------------------
def render(study: dict, meta: dict) -> str:
    out = [
        BEGIN,
        "## The study that decides GloFND's defaults: rules x alpha x testbeds",
        "",
        f"Written by `{meta['command']}` ({meta['date']}, {meta['machine']}; {meta['minutes']:.0f} "
        f"minutes of runs, two or three side by side). Every arm is a real `clipfnd train` run: tiny ViT, "
        f"{meta['num_train']} training pairs, batch {meta['batch']}, {meta['epochs']} epochs, "
        f"flags used from {START} of training on (the detector learns from step 0), seeds "
        f"{', '.join(map(str, meta['seeds']))}, paired by seed. Rules: `none` (CLIP), `paper` "
        "(`fnd.init=constant fnd.offset=false`: the paper's per-sample rule), `default` (only "
        "`fnd.detector=glofnd` and `fnd.alpha`: GloFND reads the clean view), `trainview` "
        "(the same with `fnd.view=train`: the augmented view the loss sees, the default before "
        "the clean view), `global` (one threshold, the global batch's (1 - alpha) quantile: "
        "`fnd.init=constant fnd.optimizer=sgd fnd.lr=1e-9`), `oracle`; `paper` and `global` "
        "read the training view. "
        "Precision, recall and the per-anchor shares are the final checkpoint's thresholds "
        "against the final model's un-augmented similarities over the whole training split; "
        "'train precision' is the logged `fnd/precision` over the steps that used flags "
        "(augmented views). Δ is the arm's concept mean (same-concept R@1 both ways, zero-shot "
        "top-1) less CLIP's, per seed, in points.",
        "",
    ]
    for name, tb in study.items():
        runs, rate = tb["runs"], tb["rate"]
        out += [f"### {name} (true same-concept rate {rate:.4f})", ""]
        base = arm(runs, "none", 1.0)
        orc = paired(runs, "oracle", 1.0)
        out += [
            f"CLIP's concept mean {ms([r['concept_mean'] for r in base])}; the oracle "
            f"Δ {ms(orc, 1)} points ({sum(x > 0 for x in orc)} of {len(orc)} seeds above CLIP).",
            "",
            "| rule | alpha | Δ concept mean (points) | precision | recall | train precision "
            "| image anchors within 0.5-2 x alpha (global threshold) | text anchors within "
            "(global threshold) |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for frac in FRACTIONS:
            for rule in PER_ALPHA:
                rs = arm(runs, rule, frac)
                if not rs:
                    continue

                def pa(t: str, key: str, rs=rs) -> str:
                    return ms([r[f"per_anchor_{t}"][key] for r in rs if f"per_anchor_{t}" in r])

                out.append(
                    f"| {rule} | {tag(frac)} ({rs[0]['alpha']:.4f}) | "
                    f"{ms(paired(runs, rule, frac), 1)} | {ms([r['precision'] for r in rs])} | "
                    f"{ms([r['recall'] for r in rs])} | "
                    f"{ms([r['train_precision'] for r in rs])} | "
                    f"{pa('img', 'within')} ({pa('img', 'within_global')}) | "
                    f"{pa('txt', 'within')} ({pa('txt', 'within_global')}) |"
                )
        out.append("")
    out += [
        "![study](images/fn_study.png)",
        "",
        "### A precision signal without labels",
        "",
        "Spearman rank correlation of each candidate with the true precision, over every "
        "detector run of the study above, and within each alpha (where alpha, which moves "
        "precision and every signal alike, cannot carry the correlation):",
        "",
        "| signal | runs | Spearman, all runs | "
        + " | ".join(f"within alpha = {tag(f)}" for f in FRACTIONS)
        + " |",
        "|---|---|---|" + "---|" * len(FRACTIONS),
    ]

    def rho(v: float) -> str:
        return "-" if math.isnan(v) else f"{v:+.2f}"

    for sig, overall, within, n in signal_table(study):
        out.append(f"| {sig} | {n} | {rho(overall)} | " + " | ".join(map(rho, within)) + " |")
    out += ["", "![signals](images/fn_study_signals.png)", "", END]
    return "\n".join(out)


def plot(study: dict, path: Path, sig_path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    names = list(study)
    fig = Figure(figsize=(8.4, 3.0 * len(names)), dpi=100, layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(len(names), 2, squeeze=False).ravel()
    colours = {
        "paper": "#1f77b4",
        "default": "#d62728",
        "trainview": "#ff7f0e",
        "global": "#7f7f7f",
    }
    for k, name in enumerate(names):
        runs = study[name]["runs"]
        ax_d, ax_p = axes[2 * k], axes[2 * k + 1]
        for rule in PER_ALPHA:
            xs = [f for f in FRACTIONS if arm(runs, rule, f)]
            if not xs:
                continue
            gains = {f: paired(runs, rule, f) for f in xs}
            precisions = {
                f: [r["precision"] for r in arm(runs, rule, f) if r.get("precision") is not None]
                for f in xs
            }
            for ax, by_alpha in ((ax_d, gains), (ax_p, precisions)):
                at = [f for f in xs if by_alpha[f]]
                stats = [mean_sd(by_alpha[f]) for f in at]
                ax.errorbar(
                    at,
                    [m for m, _ in stats],
                    yerr=[s for _, s in stats],
                    capsize=3,
                    label=rule,
                    c=colours[rule],
                )
        orc = paired(runs, "oracle", 1.0)
        if orc:
            ax_d.axhline(statistics.mean(orc), ls="--", c="green", label="oracle")
        ax_d.axhline(0, c="k", lw=0.5)
        for ax, title, ylabel in (
            (ax_d, f"{name}: gain over CLIP", "Δ concept mean (points)"),
            (ax_p, f"{name}: precision of the flags", "precision"),
        ):
            ax.set_xscale("log", base=2)
            ax.set_xticks(list(FRACTIONS), [tag(f) for f in FRACTIONS])
            ax.minorticks_off()
            ax.set_xlabel("alpha")
            ax.set_ylabel(ylabel)
            ax.set_title(title, fontsize=9)
        ax_d.legend(fontsize=7)
    fig.savefig(path)

    fig, axes = _figure(len(SIGNALS))
    det = [
        (name, r)
        for name, tb in study.items()
        for r in tb["runs"]
        if r.get("precision") is not None
    ]
    markers = dict(zip(names, "os^v"))
    for ax, sig in zip(axes, SIGNALS):
        for name, r in det:
            if r.get(sig) is None:
                continue
            ax.scatter(
                r[sig], r["precision"], s=12, c=colours[r["rule"]], marker=markers[name], alpha=0.8
            )
        ax.set_xlabel(sig)
        ax.set_ylabel("true precision")
        ax.set_title(f"{sig} (colour: rule; marker: testbed)", fontsize=8)
    fig.savefig(sig_path)


def report(a) -> None:
    root = Path(a.out)
    study = load_runs(root)
    if not study:
        sys.exit(f"no runs under {root / 'runs'}: run the study first")
    seconds = sum(r["seconds"] for tb in study.values() for r in tb["runs"])
    meta = {
        "command": "; ".join(
            f"python benchmarks/fn_study.py --testbeds {tb} --seeds 0 1 2" for tb in study
        )
        + "; python benchmarks/fn_study.py --report",
        "date": str(date.today()),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPU cores (shared), {a.threads} torch "
        f"thread a run, torch {torch.__version__}",
        "minutes": seconds / 60,
        "num_train": a.num_train,
        "batch": a.batch,
        "epochs": a.epochs,
        "seeds": sorted({r["seed"] for tb in study.values() for r in tb["runs"]}),
    }
    docs = Path(a.docs)
    images = docs / "images"
    images.mkdir(parents=True, exist_ok=True)
    (docs / "fn_study.json").write_text(json.dumps({"meta": meta, "study": study}, indent=1) + "\n")
    plot(study, images / "fn_study.png", images / "fn_study_signals.png")
    if not a.quick:
        write_section(docs / "results.md", render(study, meta), BEGIN, END)
    for sig, overall, within, n in signal_table(study):
        print(
            f"{sig}: Spearman with precision {overall:+.2f} over {n} runs; within alpha "
            + ", ".join(f"{w:+.2f}" for w in within)
        )


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--testbeds", nargs="+", default=["fn-testbed", "fn-longtail"])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--fractions", type=float, nargs="+", default=list(FRACTIONS))
    p.add_argument("--epochs", type=int, default=40)
    p.add_argument("--num-train", type=int, default=1024)
    p.add_argument("--num-val", type=int, default=1024)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=str(ROOT / "runs" / "bench" / "fn_study"))
    p.add_argument("--docs", default=str(ROOT / "docs"))
    p.add_argument("--report", action="store_true", help="gather the saved runs into the page")
    p.add_argument(
        "--quick", action="store_true", help="one seed, 6 epochs, 256 pairs (make bench)"
    )
    a = p.parse_args()
    if a.quick:
        a.testbeds, a.seeds, a.fractions = ["fn-testbed"], [0], [0.25]
        a.epochs, a.num_train, a.num_val, a.batch = 6, 256, 256, 64
        a.out = str(ROOT / "runs" / "bench" / "fn_study_quick")
        a.docs = a.out
    if a.report:
        report(a)
        return
    gather(a)
    if a.quick:
        report(a)


if __name__ == "__main__":
    main()
