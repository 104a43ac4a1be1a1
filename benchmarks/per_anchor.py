"""GloFND per anchor on a long tail: does each anchor flag alpha of its *own* negatives, and do
learned per-sample thresholds beat one global threshold flagging the same total?

The data is ``clipfnd data synthetic --preset fn-longtail`` (the fn-testbed's 16 concepts drawn
from 30 % of the data down to 1.8 %). Each arm is a real ``clipfnd train`` run (a default run
sets only ``fnd.detector`` and ``fnd.alpha``); after it, the final checkpoint's thresholds
(offset included) are measured against the final model's similarities over the whole
training split (``clipfnd.fnd.per_anchor.measure``, as ``clipfnd report`` does): the share of
anchors within 0.5-2 x alpha of their own negatives, under the learned thresholds and under one
global threshold. ``--ceiling`` adds what an estimator could reach at best:

- with drift between visits: each anchor's exact quantile (un-augmented features) under the
  model of an earlier epoch's end, held against the final model;
- with training's augmentation: the thresholds learn from the images as training sees them,
  a random crop at every visit (open_clip's ``RandomResizedCrop``), while the measure reads
  the un-augmented image. Each image anchor's exact quantile under the final model averaged
  over 8 crops (and each text anchor's, against 8 crops of every image), held against the
  un-augmented features: the best any estimator fed training's views reaches, with no drift.

    python benchmarks/per_anchor.py [--seeds 0] [--epochs 16] [--arms default paper-adam]
        [--set fnd.quantile_weight=0.85]
        [--ceiling] [--out runs/bench/per_anchor]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

ARMS: dict[str, list[str]] = {
    "default": [],  # fnd.optimizer auto (quantile here), init quantile, offset on
    "adam (the previous default)": ["fnd.optimizer=adam"],
    "paper's rule": ["fnd.optimizer=adam", "fnd.init=constant", "fnd.offset=false"],
}


def data(root: Path, n_train: int) -> Path:
    from data_pipelines import synthetic
    from data_pipelines.shards import write_split

    out = root / "fn-longtail"
    if not (out / "train" / "manifest.json").exists():
        spec = synthetic.preset_spec("fn-longtail")
        names = synthetic.label_names(spec)
        for split, n in (("train", n_train), ("val", 1024)):
            write_split(
                out / split, synthetic.generate(spec, n, split), shard_size=1000, label_names=names
            )
    return out


def features(run: Path, step: int | None = None):
    from clipfnd.checkpoints import final_path, load_checkpoint
    from clipfnd.config import from_dict
    from clipfnd_eval.layouts import open_dataset
    from clipfnd_eval.samples import collect, encode

    ck = load_checkpoint(final_path(run, step) if step else run)
    cfg = from_dict(ck.config)
    samples, _ = collect(open_dataset(cfg.data.train, default_split="train"), 10**6, True)
    feats, samples, _ = encode(ck, "clip", samples, 256, torch.device("cpu"), False)
    return ck, cfg, feats, torch.tensor([s.index for s in samples])


def measure_run(run: Path, alpha: float) -> dict:
    from clipfnd.fnd.per_anchor import flag_thresholds, measure
    from clipfnd.report.scoring import _detector, read_tables
    from clipfnd.state.files import load_detector_state, load_tables

    ck, cfg, feats, index = features(run)
    tables = read_tables(ck)
    det = _detector(cfg, tables, True)
    load_tables(tables, ck.path)
    load_detector_state(det, ck.path, ck.step or 0)
    out = {}
    for t, o in (("img", "txt"), ("txt", "img")):
        thr = flag_thresholds(tables, t, index, det.offsets)
        m = measure(feats[t], feats[o], torch.arange(len(index)), thr, alpha)
        out[t] = {**m.metrics(""), "anchors": len(index)}
    return out


def ceiling(run: Path, steps: list[int], alpha: float) -> dict:
    from clipfnd.fnd.per_anchor import measure

    _, _, final, _ = features(run)
    out = {}
    for step in steps:
        _, _, early, _ = features(run, step)
        for t, o in (("img", "txt"), ("txt", "img")):
            s = early[t].double() @ early[o].double().T
            s.fill_diagonal_(float("nan"))
            q = torch.nanquantile(s, 1 - alpha, dim=1)
            m = measure(final[t], final[o], torch.arange(len(q)), q, alpha)
            out.setdefault(str(step), {})[t] = m.within
    return out


def crop_ceiling(run: Path, alpha: float, crops: int = 8) -> dict:
    from clipfnd.checkpoints import load_checkpoint
    from clipfnd.config import from_dict
    from clipfnd.fnd.per_anchor import measure
    from clipfnd_eval.layouts import open_dataset
    from clipfnd_eval.samples import collect, encode

    ck = load_checkpoint(run)
    cfg = from_dict(ck.config)
    samples, _ = collect(open_dataset(cfg.data.train, default_split="train"), 10**6, True)
    clean, samples, _ = encode(ck, "clip", samples, 256, torch.device("cpu"), False)
    ck.bundle.preprocess_val = ck.bundle.preprocess_train  # the crops training draws
    torch.manual_seed(0)
    n = len(samples)
    eye = torch.eye(n, dtype=torch.bool)
    qs: dict[str, list[torch.Tensor]] = {"img": [], "txt": []}
    for _ in range(crops):
        aug, _, _ = encode(ck, "clip", samples, 256, torch.device("cpu"), False)
        for t, (a, b) in {
            "img": (aug["img"], clean["txt"]),
            "txt": (clean["txt"], aug["img"]),
        }.items():
            s = a.double() @ b.double().T
            s[eye] = float("nan")
            qs[t].append(torch.nanquantile(s, 1 - alpha, dim=1))
    out = {}
    for t, o in (("img", "txt"), ("txt", "img")):
        q = torch.stack(qs[t]).mean(0)
        out[t] = measure(clean[t], clean[o], torch.arange(n), q, alpha).within
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--epochs", type=int, default=16)
    p.add_argument("--alpha", type=float, default=0.02)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--num-train", type=int, default=1664)
    p.add_argument("--arms", nargs="+", default=list(ARMS))
    p.add_argument("--ceiling", action="store_true")
    p.add_argument(
        "--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides for every arm"
    )
    p.add_argument("--out", default=str(ROOT / "runs" / "bench" / "per_anchor"))
    a = p.parse_args()
    torch.set_num_threads(1)
    from clipfnd.config import load_config
    from clipfnd.train.loop import train

    root = Path(a.out)
    d = data(root, a.num_train)
    steps_per_epoch = a.num_train // a.batch_size
    results = []
    tag = "".join(f"-{x}" for x in a.set)  # runs and results of other settings kept apart
    for seed in a.seeds:
        for arm in a.arms:
            run = root / "runs" / f"{arm.split()[0]}{tag}-{seed}"
            keep = a.ceiling and arm == "default"
            cfg = load_config(
                None,
                [
                    f"data.train={d / 'train'}",
                    f"data.val={d / 'val'}",
                    f"data.batch_size={a.batch_size}",
                    "data.num_workers=0",
                    f"output_dir={run}",
                    f"seed={seed}",
                    "optim.lr=2e-3",
                    "optim.warmup_steps=20",
                    f"train.epochs={a.epochs}",
                    "fnd.detector=glofnd",
                    f"fnd.alpha={a.alpha}",
                    "train.progress=false",
                    "train.report_to=none",
                    "train.plots=false",
                    f"train.log_every={steps_per_epoch}",
                    f"train.checkpoint_every={steps_per_epoch if keep else 0}",
                    f"train.keep_checkpoints={a.epochs + 1 if keep else 1}",
                    "eval.tasks=[retrieval,zeroshot]",
                    "overwrite=true",
                    *ARMS[arm],
                    *a.set,
                ],
            )
            t0 = time.perf_counter()
            summary = train(cfg)
            r = {
                "arm": arm + (f" with {' '.join(a.set)}" if a.set else ""),
                "seed": seed,
                "seconds": time.perf_counter() - t0,
            }
            r["per_anchor"] = measure_run(run, a.alpha)
            r["eval"] = {
                k: summary["eval"][k] for k in ("label_i2t_R@1", "label_t2i_R@1", "zeroshot/top1")
            }
            if keep:
                last = a.epochs * steps_per_epoch
                r["ceiling"] = ceiling(
                    run, [last - steps_per_epoch * k for k in (1, 2, 4)], a.alpha
                )
                r["crop_ceiling"] = crop_ceiling(run, a.alpha)
            results.append(r)
            pa = r["per_anchor"]
            print(
                f"{r['arm']:28s} seed {seed}: within 0.5-2 x alpha: image {pa['img']['within']:.3f} "
                f"(one global threshold {pa['img']['within_global']:.3f}), text "
                f"{pa['txt']['within']:.3f} ({pa['txt']['within_global']:.3f}); "
                f"{r['seconds']:.0f} s",
                flush=True,
            )
            if "ceiling" in r:
                print(f"  ceiling (exact quantile at an earlier step): {r['ceiling']}", flush=True)
                print(f"  ceiling (exact quantile over training's crops): {r['crop_ceiling']}")
    (root / f"per_anchor{tag}.json").write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
