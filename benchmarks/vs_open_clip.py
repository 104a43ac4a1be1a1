"""clipfnd's trainer against open_clip's (``python -m open_clip_train.main``): samples/s and
peak memory on the same model, shards, batch, precision and steps, runs alternating.

    python benchmarks/vs_open_clip.py [--samples 4096] [--batch 128] [--rounds 2] [--workers 1]
                                      [--log-every N] [--compile]

- The model: a small ViT (width 128, 4 + 4 layers, 64 px, patch 8), written as an
  ``open_clip_config.json`` that both trainers read as ``local-dir:DIR`` (random init).
- The data: ``clipfnd data synthetic`` shards at 64 px, read by clipfnd's loader and, as they
  are, by open_clip's webdataset pipeline (``--dataset-type webdataset``).
- open_clip's trainer runs in its own virtual environment (``.bench/openclip-venv``, made here
  if missing) that pins the webdataset its ``[training]`` extra asks for (<= 0.2.86) and
  takes everything else (torch, open_clip) from this one.
- Both: one process, fp32, ``--workers``/``data.num_workers`` loader processes, no gradient
  clipping, one epoch of ``samples / batch`` steps, no evaluation, no checkpoint in between.
- Throughput: the median of the trainers' own per-interval samples/s after the first
  quarter of the steps (open_clip's log lines: the last step's; clipfnd's ``metrics.jsonl``:
  the steps since the last line), a line every ``--log-every`` steps in both. Peak memory: the
  peak resident set of the trainer process.

Printed: samples/s of each, the ratio clipfnd / open_clip, then clipfnd with GloFND and
with FastCLIP-v3 + GloFND against clipfnd's CLIP. Figures depend on the machine: compare
only within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import sysconfig
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / ".bench" / "vs_open_clip"
VENV = ROOT / ".bench" / "openclip-venv"

MODEL = {
    "embed_dim": 128,
    "vision_cfg": {"image_size": 64, "layers": 4, "width": 128, "head_width": 32, "patch_size": 8},
    "text_cfg": {"context_length": 32, "vocab_size": 49408, "width": 128, "heads": 4, "layers": 4},
}
PEAK = (
    "import resource, subprocess, sys; p = subprocess.run(sys.argv[1:]); "
    "print('PEAK_KIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, flush=True); "
    "sys.exit(p.returncode)"
)


def sh(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, text=True, **kw)


def prepare(a: argparse.Namespace) -> tuple[Path, Path, int]:
    model_dir = BENCH / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": MODEL, "preprocess_cfg": {}}, indent=2)
    )
    data = BENCH / f"data_{a.samples}"
    if not (data / "train" / "manifest.json").exists():
        sh(
            [sys.executable, "-m", "clipfnd", "data", "synthetic", "--out", str(data)]
            + ["--num-samples", str(a.samples), "--num-val", "0", "--image-size", "64"]
            + ["--num-concepts", "64", "--shard-size", "512"],
            capture_output=True,
        )
    shards = len(json.loads((data / "train" / "manifest.json").read_text())["shards"])
    if not (VENV / "bin" / "python").exists():
        sh([sys.executable, "-m", "venv", str(VENV)])
        site = sh(
            [
                str(VENV / "bin" / "python"),
                "-c",
                "import sysconfig; print(sysconfig.get_paths()['purelib'])",
            ],
            capture_output=True,
        ).stdout.strip()
        # this environment's packages after the venv's own: only webdataset differs
        (Path(site) / "clipfnd_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
        sh(
            [str(VENV / "bin" / "python"), "-m", "pip", "install", "-q"]
            + ["webdataset>=0.2.5,<=0.2.86", "pandas", "braceexpand"]
        )
    return model_dir, data / "train", shards


def run_open_clip(a, model_dir: Path, train: Path, shards: int, i: int) -> dict:
    logs = BENCH / "logs"
    name = f"oc_{os.getpid()}_{i}"
    cmd = [str(VENV / "bin" / "python"), "-m", "open_clip_train.main"]
    cmd += ["--dataset-type", "webdataset", "--train-data"]
    cmd += [str(train / f"shard-{{000000..{shards - 1:06d}}}.tar")]
    cmd += ["--train-num-samples", str(a.samples), "--batch-size", str(a.batch), "--epochs", "1"]
    cmd += ["--workers", str(a.workers), "--model", f"local-dir:{model_dir}", "--precision", "fp32"]
    cmd += ["--lr", "1e-3", "--warmup", "4", "--wd", "0.1", "--log-every-n-steps", str(a.log_every)]
    cmd += ["--logs", str(logs), "--name", name, "--save-frequency", "0", "--seed", "0"]
    cmd += ["--report-to", "", "--device", "cpu"]
    out = sh([sys.executable, "-c", PEAK, *cmd], capture_output=True, env=_env())
    text = out.stdout + out.stderr
    rates = [float(x) for x in re.findall(r"([0-9.]+)/s/gpu", text)]
    if not rates:
        raise RuntimeError("open_clip printed no throughput:\n" + text[-3000:])
    return {"samples_per_sec": _steady(rates), "peak_mib": _peak(text)}


def run_clipfnd(a, model_dir: Path, train: Path, i: int, extra: list[str]) -> dict:
    run = BENCH / "runs" / f"cf_{os.getpid()}_{i}"
    cmd = [sys.executable, "-m", "clipfnd", "train", str(ROOT / "configs" / "demo.yaml")]
    cmd += [f"model.name=local-dir:{model_dir}", f"data.train={train}", "data.val=null"]
    cmd += [f"data.batch_size={a.batch}", f"data.num_workers={a.workers}", "optim.grad_clip=null"]
    cmd += ["optim.warmup_steps=4", "train.epochs=1", f"train.log_every={a.log_every}"]
    cmd += ["train.progress=false"]
    cmd += ["train.report_to=none", "train.plots=false", "train.checkpoint_every=0"]
    cmd += ["eval.at_end=false", "fnd.detector=none", f"output_dir={run}", "overwrite=true"]
    out = sh([sys.executable, "-c", PEAK, *cmd, *extra], capture_output=True, env=_env())
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    rates = [r["samples_per_sec"] for r in recs if "samples_per_sec" in r]
    return {"samples_per_sec": _steady(rates), "peak_mib": _peak(out.stdout)}


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count() or 2), "CUDA_VISIBLE_DEVICES": ""}


def _steady(rates: list[float]) -> float:
    return statistics.median(rates[len(rates) // 4 :] or rates)


def _peak(text: str) -> float:
    m = re.findall(r"PEAK_KIB (\d+)", text)
    return int(m[-1]) / 1024 if m else float("nan")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=4096)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument(
        "--log-every", type=int, default=1, help="steps between log lines, in both trainers"
    )
    p.add_argument(
        "--compile",
        action="store_true",
        help="also clipfnd with train.compile=true (torch.compile, inductor): steady-state "
        "samples/s after the first quarter of the steps, so the compile time is not counted",
    )
    a = p.parse_args()
    model_dir, train, shards = prepare(a)
    settings = {
        "open_clip": lambda i: run_open_clip(a, model_dir, train, shards, i),
        "clipfnd": lambda i: run_clipfnd(a, model_dir, train, i, []),
        "clipfnd+glofnd": lambda i: run_clipfnd(
            a,
            model_dir,
            train,
            i,
            [
                "fnd.detector=glofnd",
                "fnd.start_update=0",
                "fnd.start_mask=0",
                "fnd.init_threshold=0.5",
            ],
        ),
        "clipfnd+fastclip_v3+glofnd": lambda i: run_clipfnd(
            a,
            model_dir,
            train,
            i,
            [
                "loss.name=fastclip_v3",
                "fnd.detector=glofnd",
                "fnd.start_update=0",
                "fnd.start_mask=0",
                "fnd.init_threshold=0.5",
            ],
        ),
    }
    if a.compile:
        settings["clipfnd+compile"] = lambda i: run_clipfnd(
            a, model_dir, train, i, ["train.compile=true"]
        )
    got: dict[str, list[dict]] = {k: [] for k in settings}
    names = list(settings)
    for r in range(a.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            got[name].append(settings[name](r))
            print(f"round {r}: {name} {got[name][-1]['samples_per_sec']:.1f} samples/s", flush=True)
    med = {k: statistics.median(x["samples_per_sec"] for x in v) for k, v in got.items()}
    mem = {k: statistics.median(x["peak_mib"] for x in v) for k, v in got.items()}
    print(
        f"\nsmall ViT (128 wide, 4+4 layers, 64 px), batch {a.batch}, fp32, {a.samples // a.batch} "
        f"steps, {a.workers} loader worker(s), {a.rounds} rounds, {os.cpu_count()} CPUs"
    )
    print(f"{'trainer':<28} {'samples/s':>10} {'peak MiB':>9} {'ratio':>22}")
    for k in names:
        base = {"open_clip": None, "clipfnd": "open_clip", "clipfnd+compile": "open_clip"}.get(
            k, "clipfnd"
        )
        ratio = f"{med[k] / med[base]:.3f} vs {base}" if base else ""
        print(f"{k:<28} {med[k]:>10.1f} {mem[k]:>9.0f} {ratio:>22}")


if __name__ == "__main__":
    main()
