"""Vision-only results: kNN and linear-probe accuracy of every method, over seeds, and what
IFND's clustering costs next to GloFND's per-step work as the dataset grows.

Part 1 trains the same tiny encoder with the same budget under SimCLR, SogCLR, SimCLR+GloFND,
SogCLR+GloFND, IFND (eliminate, attract), SSCL, DCL, HCL and the oracle detector, on
scikit-learn's digits and on the built-in shapes (image-only use of both), over several seeds,
and reports the mean and spread of kNN (k=20) and linear-probe top-1 on the held-out split,
with the detection precision/recall of the detectors over training.

Part 2 times, at N = 10^4 and 10^5 generated images: one IFND clustering (embedding the whole
set plus k-means over the hierarchy; it runs every ``cluster_every`` epochs) and GloFND's
per-step overhead (the objective with GloFND over the objective without a detector, at the
same batch, measured interleaved), and what each costs per epoch.

Part 3 (``--study glofnd``) removes false negatives over a long schedule: SimCLR and SogCLR,
each plain, with GloFND and with the oracle detector, trained long enough that every
threshold gets tens of updates (40 epochs of a small set), masking from a third of training.
GloFND starts each threshold at its sample's quantile and adds the offset re-estimated every
step (``fnd.init=quantile fnd.offset=true``), with ``fnd.alpha`` the true same-class rate of
the training set. Besides digits and the shapes it runs the vision testbed: the fn-testbed's
colour-shape concepts used image-only, each image with its own position, size and
background, and views that keep them (a high ``data.crop_min_scale``, little colour jitter).
For every GloFND arm: its calibration (the flagged share over alpha on the masked steps), its
precision and recall, and the share of the plain-oracle gap in kNN top-1 it closes, per seed.

    python benchmarks/vision_results.py [--seeds 0 1 2] [--epochs 8] [--out docs/results.md]
    python benchmarks/vision_results.py --study glofnd [--seeds 0 1 2] [--epochs 40]
    python benchmarks/vision_results.py --study glofnd --from-json   # redraw from the JSON
    python benchmarks/vision_results.py --study glofnd --quick       # one seed, testbed (~3 min)

Parts 1-2 write the tables (markdown) to ``--out`` and the raw numbers beside it as JSON.
Part 3 writes its subsection of ``--out`` (between the ``vision_glofnd`` markers, inside
"Vision-only methods"; the rest of the file and the hand-written notes below its notes
marker are kept), its raw numbers to ``docs/vision_glofnd.json`` (after every run, so an
interrupted study resumes with ``--resume``) and its plots to ``docs/images/vision_*.png``.
Every run is a real ``clipfnd`` training run in this process; nothing is downloaded.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

METHODS: dict[str, tuple[str, list[str]]] = {  # name -> (base config, overrides)
    "SimCLR": ("simclr", []),
    "SogCLR": ("sogclr", []),
    "SimCLR + GloFND": ("glofnd", []),
    "SogCLR + GloFND": ("glofnd", ["loss.name=sogclr", "loss.gamma_min=0.5"]),
    "IFND (eliminate)": ("ifnd", []),
    "IFND (attract)": ("ifnd", ["fnd.removal=attract"]),
    "SSCL": ("sscl", []),
    "DCL": ("dcl", []),
    "HCL": ("hcl", []),
    "SimCLR + oracle": ("simclr", ["fnd.detector=oracle", "fnd.start_mask=2"]),
}


def build_data(root: Path, shapes_train: int) -> dict[str, Path]:
    from data_pipelines import digits, synthetic
    from data_pipelines.shards import write_split

    out = {}
    d = root / "digits"
    digits.write_splits(d, seed=0, shard_size=180, progress=False)
    out["digits"] = d
    s = root / "shapes"
    spec = synthetic.SyntheticSpec(num_concepts=16, seed=0, image_size=32)
    names = synthetic.label_names(spec)
    for split, n in (("train", shapes_train), ("val", shapes_train // 4)):
        write_split(
            s / split,
            synthetic.generate(spec, n, split),
            shard_size=256,
            label_names=names,
            progress=False,
        )
    out["shapes"] = s
    return out


def run_one(data: Path, method: str, seed: int, epochs: int, out_dir: Path) -> dict:
    from clipfnd.config import load_config
    from clipfnd.train.loop import train

    base, extra = METHODS[method]
    # detectors from a third of the budget on (the digits configs scale their epoch-15
    # schedule down with the budget)
    start = max(1, epochs // 3)
    cfg = load_config(
        ROOT / "configs" / f"simclr_digits_{base}.yaml",
        [
            f"data.train={data / 'train'}",
            f"data.val={data / 'val'}",
            f"output_dir={out_dir}",
            f"seed={seed}",
            f"train.epochs={epochs}",
            "data.image_size=16",
            "train.progress=false",
            "train.report_to=none",
            "train.plots=false",
            "train.log_every=4",
            "eval.every_epochs=0",
            "eval.tasks=[knn,linear-probe]",
            f"fnd.start_update={start}",
            f"fnd.start_mask={start}",
            f"fnd.cluster_every={max(1, epochs // 4)}",
            "overwrite=true",
            *extra,
        ],
    )
    t0 = time.perf_counter()
    summary = train(cfg)
    lines = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    det = [r for r in lines if "fnd/precision" in r]
    return {
        "knn": summary["eval"]["knn/top1"],
        "linear_probe": summary["eval"]["linear-probe/top1"],
        "precision": statistics.mean(r["fnd/precision"] for r in det) if det else None,
        "recall": statistics.mean(r["fnd/recall"] for r in det) if det else None,
        "seconds": time.perf_counter() - t0,
    }


NOTES_MARKER = "<!-- notes: written by hand, kept when the tables are regenerated -->"


def fmt(values: list[float]) -> str:
    if not values:
        return "-"
    m = statistics.mean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{m:.3f} ± {sd:.3f}"


# --- part 2: costs -----------------------------------------------------------------------------
def clustering_cost(root: Path, n: int, batch: int) -> dict:
    """Seconds of one IFND clustering at the start of an epoch (embedding + k-means), and
    GloFND's per-step overhead at the same batch (interleaved, median of 30)."""
    from clipfnd.config import load_config
    from clipfnd.state import StateTables
    from clipfnd.train.build import build_run
    from clipfnd.train.loop import embed_training_set
    from clipfnd.train.objective import SimCLRObjective
    from data_pipelines import synthetic
    from data_pipelines.shards import write_split

    spec = synthetic.SyntheticSpec(num_concepts=64, seed=1, image_size=16)
    data = root / f"gen{n}"
    write_split(
        data,
        synthetic.generate(spec, n, "train"),
        shard_size=5000,
        progress=False,
        label_names=synthetic.label_names(spec),
    )
    cfg = load_config(
        ROOT / "configs" / "simclr_digits_ifnd.yaml",
        [
            f"data.train={data}",
            "data.val=null",
            f"output_dir={root / f'run{n}'}",
            "data.image_size=16",
            "fnd.num_clusters=[10,25,50]",
            "train.progress=false",
            "train.report_to=none",
            "train.plots=false",
            "eval.batch_size=1024",
            "overwrite=true",
        ],
    )
    s = build_run(cfg)
    t0 = time.perf_counter()
    index, feats = embed_training_set(cfg, s)
    t_embed = time.perf_counter() - t0
    t0 = time.perf_counter()
    start = s.objective.detector.start_epoch(
        cfg.fnd.start_update, lambda: (index, feats), fresh=True
    )
    start.write(s.tables)
    t_kmeans = time.perf_counter() - t0

    # GloFND's overhead: the objective on fixed features, with and without the detector
    def objective(detector: str):
        c = load_config(
            None,
            ["mode=simclr", f"data.train={data}", f"fnd.detector={detector}", "fnd.alpha=0.01"],
        )
        return SimCLRObjective(c, StateTables(n), has_labels=True)

    g = torch.Generator().manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(2 * batch, 64, generator=g), dim=1)
    idx = torch.randperm(n, generator=g)[:batch]
    lab = idx % 64
    with_fnd, without = objective("glofnd"), objective("none")

    def step(obj):
        zz = z.clone().requires_grad_()
        t = time.perf_counter()
        out = obj(zz, torch.tensor(5.0), idx, lab, epoch=1, measure=False)
        out.loss.backward()
        obj.commit(out)
        return time.perf_counter() - t

    ta, tb = [], []
    for _ in range(30):
        ta.append(step(with_fnd))
        tb.append(step(without))
    overhead = statistics.median(ta) - statistics.median(tb)
    steps = n // batch
    return {
        "n": n,
        "embed_s": t_embed,
        "kmeans_s": t_kmeans,
        "glofnd_step_overhead_ms": overhead * 1e3,
        "objective_step_ms": statistics.median(tb) * 1e3,
        "glofnd_epoch_overhead_s": overhead * steps,
        "steps_per_epoch": steps,
    }


# --- part 3: removing false negatives over a long schedule --------------------------------------
GLOFND = ["fnd.detector=glofnd", "fnd.init=quantile", "fnd.offset=true", "fnd.start_update=0"]
ARMS: dict[str, tuple[str, list[str]]] = {  # name -> (base config, overrides)
    "SimCLR": ("simclr", []),
    "SimCLR + GloFND": ("simclr", GLOFND),
    "SimCLR + oracle": ("simclr", ["fnd.detector=oracle"]),
    "SogCLR": ("sogclr", []),
    "SogCLR + GloFND": ("sogclr", GLOFND),
    "SogCLR + oracle": ("sogclr", ["fnd.detector=oracle"]),
}
GAPS = {  # GloFND arm -> (plain arm, oracle arm): the gap its kNN top-1 is measured against
    "SimCLR + GloFND": ("SimCLR", "SimCLR + oracle"),
    "SogCLR + GloFND": ("SogCLR", "SogCLR + oracle"),
}
COUNTS = (0.7, 1.5)  # mean flagged / alpha over the masked steps within which a GloFND arm counts
STUDY_DATA = ("digits", "shapes", "testbed")
STUDY_BEGIN, STUDY_END = "<!-- vision_glofnd:begin -->", "<!-- vision_glofnd:end -->"
STUDY_NOTES = "<!-- vision_glofnd:notes: written by hand, kept when the section is regenerated -->"


def write_synthetic(out: Path, spec, n_train: int) -> list[int]:
    """Train and val (a quarter of train) splits of ``spec``; the training labels."""
    from data_pipelines import synthetic
    from data_pipelines.shards import write_split

    labels: list[int] = []

    def noted(samples):
        for sample in samples:
            labels.append(sample.label)
            yield sample

    for split, n in (("train", n_train), ("val", n_train // 4)):
        samples = synthetic.generate(spec, n, split)
        write_split(
            out / split,
            noted(samples) if split == "train" else samples,
            shard_size=256,
            label_names=synthetic.label_names(spec),
            progress=False,
        )
    return labels


def study_data(root: Path, name: str, a) -> dict:
    """A study data set: its folder, true same-class rate, view settings and description."""
    from fn_benefit import same_label_rate  # the chance another training image shares the label

    from data_pipelines import digits, synthetic

    out = root / name
    if name == "digits":
        digits.write_splits(out, seed=0, shard_size=180, progress=False)
        labels = [s.label for s in digits.generate("train", seed=0)]
        views = ["data.image_size=16"]
        what = "scikit-learn's digits (10 classes), the recipe's views"
    elif name == "shapes":
        spec = synthetic.SyntheticSpec(num_concepts=16, seed=0, image_size=32)
        labels = write_synthetic(out, spec, a.shapes_train)
        views = ["data.image_size=16"]
        what = (
            "the built-in shapes (16 concepts: the colour, shape and position of one or two "
            "objects), the recipe's views"
        )
    else:
        spec = synthetic.preset_spec(a.testbed_preset, num_concepts=a.testbed_concepts)
        labels = write_synthetic(out, spec, a.testbed_train)
        views = [
            f"data.image_size={a.testbed_size}",
            f"data.crop_min_scale={a.testbed_crop}",
            f"data.augment_strength={a.testbed_jitter}",
        ]
        what = (
            f"`--preset {a.testbed_preset} --num-concepts {a.testbed_concepts}` image-only; "
            f"views: {a.testbed_size} px, crops of {a.testbed_crop:.0%}-100% of the image, "
            f"colour jitter strength {a.testbed_jitter}"
        )
    return {
        "path": str(out),
        "rate": same_label_rate(labels),
        "classes": len(set(labels)),
        "train": len(labels),
        "views": views,
        "what": what,
    }


def study_run(data: dict, arm: str, seed: int, a, out_dir: Path) -> dict:
    """One training run of the study: held-out kNN and probe top-1, and the detector's
    calibration, precision and recall over the masked steps, with their logged series."""
    from clipfnd.config import load_config
    from clipfnd.train.loop import train

    base, extra = ARMS[arm]
    detector = [f"fnd.start_mask={a.mask_start}%"] if extra else []
    if "fnd.detector=glofnd" in extra:
        detector.append(f"fnd.alpha={data['rate'] * a.alpha_fraction:.6f}")
    cfg = load_config(
        ROOT / "configs" / f"simclr_digits_{base}.yaml",
        [
            f"data.train={Path(data['path']) / 'train'}",
            f"data.val={Path(data['path']) / 'val'}",
            f"output_dir={out_dir}",
            f"seed={seed}",
            f"train.epochs={a.epochs}",
            *data["views"],
            "data.num_workers=0",
            "train.progress=false",
            "train.report_to=none",
            "train.plots=false",
            "train.log_every=4",
            "train.checkpoint_every=0",
            "eval.every_epochs=0",
            "eval.tasks=[knn,linear-probe]",
            "overwrite=true",
            *extra,
            *detector,
        ],
    )
    t0 = time.perf_counter()
    summary = train(cfg)
    lines = [json.loads(x) for x in (out_dir / "metrics.jsonl").read_text().splitlines()]
    masked = [r for r in lines if r.get("fnd/masking") == 1.0 and "fnd/flagged_over_alpha" in r]
    keys = ("flagged_over_alpha", "precision", "recall", "threshold_gap_view")
    series = [
        {"step": r["step"], **{k: r[f"fnd/{k}"] for k in keys if f"fnd/{k}" in r}}
        for r in lines
        if any(f"fnd/{k}" in r for k in keys)
    ]

    def mean(key: str, rows: list[dict]) -> float | None:
        values = [r[key] for r in rows if key in r]
        return statistics.mean(values) if values else None

    return {
        "knn": summary["eval"]["knn/top1"],
        "linear_probe": summary["eval"]["linear-probe/top1"],
        "calibration": mean("fnd/flagged_over_alpha", masked),
        "precision": mean("fnd/precision", lines),
        "recall": mean("fnd/recall", lines),
        "mask_start_step": summary["fnd_mask_start_step"],
        "total_steps": lines[-1]["step"] if lines else None,
        "series": series,
        "seconds": time.perf_counter() - t0,
    }


def run_study(a) -> None:
    """Every (data set, arm, seed) not yet in ``--json`` (with ``--resume``), saved after each."""
    path = Path(a.json)
    fresh = {"config": {}, "data": {}, "runs": {}, "seconds": 0.0}
    results = json.loads(path.read_text()) if a.resume and path.exists() else fresh
    results["config"] = {
        k: getattr(a, k)
        for k in (
            "seeds",
            "epochs",
            "datasets",
            "arms",
            "mask_start",
            "shapes_train",
            "testbed_preset",
            "testbed_concepts",
            "testbed_train",
            "testbed_size",
            "testbed_crop",
            "testbed_jitter",
            "alpha_fraction",
        )
    }
    command = shlex.join(["python", "benchmarks/vision_results.py", *sys.argv[1:]])
    results["commands"] = [c for c in results.get("commands", []) if c != command] + [command]
    results["machine"] = (
        f"{platform.machine()}, {os.cpu_count()} CPU cores (shared), {torch.get_num_threads()} "
        f"torch thread(s), torch {torch.__version__}"
    )
    results["date"] = date.today().isoformat()
    full = path.resolve()
    results["json"] = str(full.relative_to(ROOT) if full.is_relative_to(ROOT) else full)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for ds in a.datasets:
            data = study_data(root, ds, a)
            results["data"][ds] = {k: v for k, v in data.items() if k != "path"}
            for arm in a.arms:
                runs = results["runs"].setdefault(ds, {}).setdefault(arm, {})
                for seed in a.seeds:
                    if str(seed) in runs:
                        continue
                    r = study_run(data, arm, seed, a, root / "run")
                    runs[str(seed)] = r
                    results["seconds"] += r["seconds"]
                    path.write_text(json.dumps(results, indent=1) + "\n")
                    cal = (
                        "" if r["calibration"] is None else f" flagged/alpha {r['calibration']:.2f}"
                    )
                    det = (
                        ""
                        if r["precision"] is None
                        else (f" precision {r['precision']:.3f} recall {r['recall']:.3f}")
                    )
                    print(
                        f"{ds:7s} {arm:16s} seed {seed}: kNN {r['knn']:.3f} probe "
                        f"{r['linear_probe']:.3f}{cal}{det} ({r['seconds']:.0f} s)",
                        flush=True,
                    )
    report_study(results, a)


def per_seed(runs: dict, key: str) -> dict[str, float]:
    return {s: r[key] for s, r in runs.items() if r.get(key) is not None}


def paired(a_runs: dict, b_runs: dict, key: str = "knn") -> list[float]:
    """``b - a`` per seed both hold."""
    x, y = per_seed(a_runs, key), per_seed(b_runs, key)
    return [y[s] - x[s] for s in x if s in y]


def gap_closed(by_arm: dict, arm: str) -> list[float]:
    """Per seed: (arm - plain) / (oracle - plain) in kNN top-1 (a seed without a gap is left
    out)."""
    plain, oracle = GAPS[arm]
    if plain not in by_arm or oracle not in by_arm:
        return []
    p, o, g = (per_seed(by_arm[m], "knn") for m in (plain, oracle, arm))
    return [(g[s] - p[s]) / (o[s] - p[s]) for s in g if s in p and s in o and o[s] != p[s]]


def study_cells(by_arm: dict, arm: str) -> str:
    runs = by_arm[arm]
    vals = lambda key: list(per_seed(runs, key).values())  # noqa: E731
    gap = fmt(gap_closed(by_arm, arm)) if arm in GAPS else "-"
    cal = vals("calibration")
    counts = "" if not cal else (" ✓" if COUNTS[0] <= statistics.mean(cal) <= COUNTS[1] else " ✗")
    return (
        f"| {arm} | {fmt(vals('knn'))} | {fmt(vals('linear_probe'))} | {gap} | "
        f"{fmt(cal)}{counts} | {fmt(vals('precision'))} | {fmt(vals('recall'))} |"
    )


def oracle_line(ds: str, by_arm: dict) -> str:
    """Whether each oracle beats its plain arm by more than the seeds' spread (kNN)."""
    parts = []
    for plain, oracle in ((p, o) for p, o in GAPS.values() if p in by_arm and o in by_arm):
        diff = paired(by_arm[plain], by_arm[oracle])
        spread = max(
            statistics.stdev(per_seed(by_arm[m], "knn").values()) if len(by_arm[m]) > 1 else 0.0
            for m in (plain, oracle)
        )
        m = statistics.mean(diff)
        sd = statistics.stdev(diff) if len(diff) > 1 else 0.0
        verdict = "more than" if m > spread else "not more than"
        parts.append(
            f"{oracle} - {plain}: {100 * m:+.1f} ± {100 * sd:.1f} kNN points paired by seed, "
            f"{verdict} the larger seed spread of the two ({100 * spread:.1f})"
        )
    return f"On {ds}: " + "; ".join(parts) + "." if parts else ""


def render_study(results: dict, images: str) -> str:
    cfg = results["config"]
    minutes = results["seconds"] / 60
    frac = cfg.get("alpha_fraction", 1.0)
    share = "" if frac == 1 else f"{frac:g} x "
    views = (
        "the testbed's views are the recipe's: crops from "
        f"{cfg['testbed_crop']:.0%}, jitter strength {cfg['testbed_jitter']}"
        if cfg.get("testbed_crop", 1.0) <= 0.3
        else "the testbed's views keep position, size and background, unlike the paper's"
    )
    lines = [
        STUDY_BEGIN,
        f"### Removing false negatives, vision-only ({cfg['epochs']} epochs; {views})",
        "",
        "Produced by " + " then ".join(f"`{c}`" for c in results["commands"]) + " on "
        f"{results['machine']}, {results['date']} "
        f"({minutes:.0f} min of training and evaluation, one run at a time; raw numbers and "
        f"the logged series in `{results['json']}`). SimCLR and SogCLR "
        "(`configs/simclr_digits_{simclr,sogclr}.yaml`: tiny encoder, global batch 128, AdamW "
        f"lr 2e-3), each plain, with GloFND and with the oracle detector, {cfg['epochs']} "
        f"epochs each, so every threshold gets {cfg['epochs']} updates. The oracle and GloFND "
        f"remove flagged negatives from {cfg['mask_start']}% of training on "
        f"(`fnd.start_mask={cfg['mask_start']}%`); GloFND: `fnd.init=quantile "
        f"fnd.offset=true fnd.start_update=0`, `fnd.alpha` = {share}the true same-class rate "
        f"of the training set, otherwise the defaults. Mean ± standard deviation over seeds "
        f"{', '.join(map(str, cfg['seeds']))}. kNN (k = 20, weighted) and a logistic-"
        "regression probe on frozen backbone features, held-out top-1; **kNN is the primary "
        "metric**. Gap closed: per seed, (GloFND - plain) / (oracle - plain) in kNN, against "
        "the same loss's plain and oracle arms. Calibration: the mean of "
        "`fnd/flagged_over_alpha` over the logged steps once masking is on (a GloFND arm "
        f"counts only within [{COUNTS[0]}, {COUNTS[1]}]: ✓ / ✗). Precision and recall: the "
        "mean over the masked logged steps, against the labels, within the batch.",
        "",
    ]
    for ds, by_arm in results["runs"].items():
        d = results["data"][ds]
        lines += [
            f"#### {ds}",
            "",
            f"{d['what']}; {d['train']} training images of {d['classes']} classes, true "
            f"same-class rate {d['rate']:.4f} (about {254 * d['rate']:.0f} false negatives "
            "among an anchor's 254 negatives).",
            "",
            "| method | kNN top-1 | linear probe top-1 | gap closed | calibration | "
            "precision | recall |",
            "|---|---|---|---|---|---|---|",
        ]
        lines += [study_cells(by_arm, arm) for arm in ARMS if arm in by_arm]
        lines += ["", oracle_line(ds, by_arm), ""]
    lines += [
        f"![kNN top-1 per arm and seed]({images}/vision_glofnd_knn.png)",
        "",
        f"![GloFND's calibration over training]({images}/vision_glofnd_calibration.png)",
        "",
        STUDY_NOTES,
    ]
    return "\n".join(lines)


def write_study_section(out: Path, section: str) -> None:
    """Replace the study's subsection of ``out`` (its hand-written notes kept), or add it at
    the end of "Vision-only methods"."""
    text = out.read_text() if out.exists() else ""
    if STUDY_BEGIN in text and STUDY_END in text:
        head, rest = text.split(STUDY_BEGIN, 1)
        old, tail = rest.split(STUDY_END, 1)
        notes = old.split(STUDY_NOTES, 1)[1] if STUDY_NOTES in old else "\n"
        text = head + section + notes + STUDY_END + tail
    else:
        block = section + "\n" + STUDY_END + "\n\n"
        for anchor in ("<!-- fn_benefit:begin -->", "## Removing false negatives"):
            if anchor in text:
                head, tail = text.split(anchor, 1)
                text = head + block + anchor + tail
                break
        else:
            text = text + ("\n" if text else "") + block
    out.write_text(text)


def plot_study(results: dict, images: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sets = list(results["runs"])
    fig, axes = plt.subplots(1, len(sets), figsize=(4.2 * len(sets), 3.6), squeeze=False)
    for ax, ds in zip(axes[0], sets):
        by_arm = results["runs"][ds]
        arms = [m for m in ARMS if m in by_arm]
        for i, arm in enumerate(arms):
            v = list(per_seed(by_arm[arm], "knn").values())
            ax.scatter([i] * len(v), v, s=12, color="0.6", zorder=2)
            sd = statistics.stdev(v) if len(v) > 1 else 0.0
            ax.errorbar(i, statistics.mean(v), yerr=sd, fmt="o", color="C0", capsize=4, zorder=3)
        ax.set_xticks(range(len(arms)), arms, rotation=35, ha="right", fontsize=8)
        ax.set_title(ds)
        ax.set_ylabel("held-out kNN top-1")
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(images / "vision_glofnd_knn.png", dpi=110)
    plt.close(fig)

    # GloFND over training: the flagged share over alpha (the band in which an arm counts
    # shaded), and the precision of its flags once masking is on
    sets = [ds for ds in sets if any(a in results["runs"][ds] for a in GAPS)] or sets[:1]
    fig, axes = plt.subplots(
        2, len(sets), figsize=(4.2 * len(sets), 5.6), sharex=True, squeeze=False
    )
    for col, ds in enumerate(sets):
        top, bottom = axes[0][col], axes[1][col]
        for c, arm in enumerate(a for a in GAPS if a in results["runs"][ds]):
            for j, r in enumerate(results["runs"][ds][arm].values()):
                for ax, key in ((top, "flagged_over_alpha"), (bottom, "precision")):
                    pts = [x for x in r["series"] if key in x]
                    ax.plot(
                        [x["step"] / r["total_steps"] for x in pts],
                        [x[key] for x in pts],
                        color=f"C{c}",
                        alpha=0.6,
                        lw=1,
                        label=arm if j == 0 else None,
                    )
        for ax in (top, bottom):
            ax.axvline(results["config"]["mask_start"] / 100, color="k", ls=":", lw=1)
            ax.grid(alpha=0.3)
        top.axhspan(*COUNTS, color="0.92", zorder=0)
        top.axhline(1.0, color="0.5", lw=0.8)
        top.set_ylabel("flagged share / alpha")
        top.set_title(f"{ds} (dotted: masking starts)", fontsize=10)
        if top.get_legend_handles_labels()[0]:
            top.legend(fontsize=7)
        rate = results["data"][ds]["rate"]
        bottom.axhline(rate, color="0.5", ls="--", lw=0.8, label="random flags")
        bottom.set_ylim(0, None)
        bottom.legend(fontsize=7)
        bottom.set_ylabel("precision of the flags")
        bottom.set_xlabel("share of training")
    fig.tight_layout()
    fig.savefig(images / "vision_glofnd_calibration.png", dpi=110)
    plt.close(fig)


def report_study(results: dict, a) -> None:
    out = Path(a.out)
    images = out.parent / "images"
    images.mkdir(parents=True, exist_ok=True)
    plot_study(results, images)
    write_study_section(out, render_study(results, "images"))
    print(f"wrote {out}, {a.json} and {images}/vision_glofnd_*.png")


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument(
        "--study",
        choices=("methods", "glofnd"),
        default="methods",
        help="methods: parts 1-2 (every method, short budget; costs); glofnd: part 3",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--epochs", type=int, default=None, help="default 8 (methods), 40 (glofnd)")
    p.add_argument(
        "--datasets",
        nargs="+",
        default=None,
        choices=STUDY_DATA,
        help="default digits shapes (methods), all three (glofnd; testbed is glofnd's only)",
    )
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    p.add_argument("--shapes-train", type=int, default=2048)
    p.add_argument("--cost-sizes", type=int, nargs="*", default=[10_000, 100_000])
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--out", default=str(ROOT / "docs" / "results.md"))
    g = p.add_argument_group("--study glofnd")
    g.add_argument("--arms", nargs="+", default=list(ARMS), choices=list(ARMS))
    g.add_argument("--mask-start", type=int, default=33, help="masking from this %% of training")
    g.add_argument("--testbed-preset", default="fn-testbed")
    g.add_argument("--testbed-concepts", type=int, default=16)
    g.add_argument("--testbed-train", type=int, default=2048, help="training images")
    g.add_argument("--testbed-size", type=int, default=16, help="view side (px)")
    g.add_argument("--testbed-crop", type=float, default=0.8, help="data.crop_min_scale")
    g.add_argument("--testbed-jitter", type=float, default=0.1, help="data.augment_strength")
    g.add_argument(
        "--alpha-fraction", type=float, default=1.0, help="GloFND's fnd.alpha: this x the true rate"
    )
    g.add_argument("--json", default=str(ROOT / "docs" / "vision_glofnd.json"))
    g.add_argument("--resume", action="store_true", help="keep the runs --json already holds")
    g.add_argument("--from-json", action="store_true", help="redraw from --json, no training")
    g.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (one: on shared cores more threads wait on each other)",
    )
    g.add_argument(
        "--quick",
        action="store_true",
        help="one seed of SimCLR, + GloFND and + oracle on the testbed, 8 epochs (~3 min), "
        "written under runs/bench/vision_glofnd/",
    )
    a = p.parse_args()
    if a.study == "glofnd":
        if a.quick:
            a.seeds, a.epochs, a.datasets = [0], 8, ["testbed"]
            a.arms = ["SimCLR", "SimCLR + GloFND", "SimCLR + oracle"]
            a.out = str(ROOT / "runs" / "bench" / "vision_glofnd" / "results.md")
            a.json = str(ROOT / "runs" / "bench" / "vision_glofnd" / "vision_glofnd.json")
            Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        a.epochs = a.epochs or 40
        a.datasets = a.datasets or list(STUDY_DATA)
        if a.from_json:
            report_study(json.loads(Path(a.json).read_text()), a)
            return
        torch.set_num_threads(a.threads)
        run_study(a)
        return
    a.epochs = a.epochs or 8
    a.datasets = a.datasets or ["digits", "shapes"]
    if "testbed" in a.datasets:
        p.error("the testbed belongs to --study glofnd")
    torch.set_num_threads(max(1, torch.get_num_threads()))

    results: dict = {"quality": {}, "cost": [], "config": vars(a)}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        data = build_data(root, a.shapes_train)
        for ds in a.datasets:
            for method in a.methods:
                runs = []
                for seed in a.seeds:
                    r = run_one(data[ds], method, seed, a.epochs, root / "run")
                    runs.append(r)
                    print(
                        f"{ds:7s} {method:18s} seed {seed}: kNN {r['knn']:.3f} "
                        f"probe {r['linear_probe']:.3f} ({r['seconds']:.0f} s)",
                        flush=True,
                    )
                results["quality"].setdefault(ds, {})[method] = runs
        for n in a.cost_sizes:
            c = clustering_cost(root, n, a.batch)
            results["cost"].append(c)
            print(f"cost N={n}: {c}", flush=True)
    out = Path(a.out)
    out.with_suffix(".json").write_text(json.dumps(results, indent=2) + "\n")
    notes = ""  # the hand-written reading of the numbers below the marker is kept
    if out.exists() and NOTES_MARKER in out.read_text():
        notes = out.read_text().split(NOTES_MARKER, 1)[1]
    out.write_text(render(results, a) + "\n" + NOTES_MARKER + notes)
    print(f"wrote {out} and {out.with_suffix('.json')}")


def render(results: dict, a) -> str:
    lines = [
        "# Results",
        "",
        "Three parts, each with the command that produces it: [vision-only methods]"
        "(#vision-only-methods) (`benchmarks/vision_results.py`), [removing false negatives in "
        "CLIP training](#removing-false-negatives-quality-on-data-with-known-false-negatives) "
        "(`benchmarks/fn_benefit.py`) and [speed against open_clip's trainer]"
        "(#speed-against-open_clips-trainer) (`benchmarks/vs_open_clip.py`). All figures so far "
        "come from the shared 2-core VM, CPU only.",
        "",
        "## Vision-only methods",
        "",
        "Produced by `python benchmarks/vision_results.py "
        f"--seeds {' '.join(map(str, a.seeds))} --epochs {a.epochs}` "
        "(raw numbers in `docs/results.json`). Same tiny encoder (`model.name=tiny`, 16 px views), "
        f"same budget ({a.epochs} epochs, global batch 128, AdamW) for every method; detectors "
        "from a third of the budget on. Mean ± standard deviation over seeds "
        f"{', '.join(map(str, a.seeds))}. Held-out top-1: kNN (k = 20, weighted) and a "
        "logistic-regression probe on frozen backbone features. Detection precision/recall: "
        "mean over the logged steps once flags are used, against the labels.",
        "",
    ]
    for ds, methods in results["quality"].items():
        lines += [
            f"### {ds}",
            "",
            "| method | kNN top-1 | linear probe top-1 | detection precision | recall |",
            "|---|---|---|---|---|",
        ]
        for method, runs in methods.items():
            prec = [r["precision"] for r in runs if r["precision"] is not None]
            rec = [r["recall"] for r in runs if r["recall"] is not None]
            lines.append(
                f"| {method} | {fmt([r['knn'] for r in runs])} | "
                f"{fmt([r['linear_probe'] for r in runs])} | {fmt(prec)} | {fmt(rec)} |"
            )
        lines.append("")
    if results["cost"]:
        lines += [
            "### Cost: IFND's clustering against GloFND's per-step work",
            "",
            f"Batch {a.batch}, tiny encoder, 16 px generated images, 2 CPU cores. IFND: one "
            "clustering (embed the whole set, then k-means at 10, 25 and 50 clusters). GloFND: "
            "the objective's extra time per step (median of 30 interleaved steps, with and "
            "without the detector), times the steps of an epoch.",
            "",
            "| N | IFND embed (s) | IFND k-means (s) | GloFND per step (ms) | GloFND per epoch (s) |",
            "|---|---|---|---|---|",
        ]
        for c in results["cost"]:
            lines.append(
                f"| {c['n']:,} | {c['embed_s']:.1f} | {c['kmeans_s']:.1f} | "
                f"{c['glofnd_step_overhead_ms']:.2f} | {c['glofnd_epoch_overhead_s']:.2f} |"
            )
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
