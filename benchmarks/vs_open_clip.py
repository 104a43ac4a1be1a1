"""clipfnd's trainer against open_clip's (``python -m open_clip_train.main``): samples/s and
peak memory on the same model, shards, batch, precision and steps, runs alternating.

    python benchmarks/vs_open_clip.py [--samples 4096] [--batch 128] [--rounds 2] [--workers 1]
                                      [--log-every N] [--compile] [--model tiny|NAME]
                                      [--precision fp32|bf16] [--device cpu|cuda]
                                      [--settings open_clip clipfnd ...] [--out FILE.json]

- The model: ``tiny`` (default), a small ViT (width 128, 4 + 4 layers, 64 px, patch 8),
  written as an ``open_clip_config.json`` that both trainers read as ``local-dir:DIR``; or an
  open_clip model name (``ViT-B-32``). Random init in both.
- The data: ``clipfnd data synthetic`` shards (JPEG, quality 90) at the model's side (64 px
  for ``tiny``, else 256 px, as img2dataset writes them), read by clipfnd's loader and, as
  they are, by open_clip's webdataset pipeline (``--dataset-type webdataset``).
- Precision: ``fp32``, or ``bf16`` autocast (open_clip's ``--precision amp_bf16``, clipfnd's
  ``train.mixed_precision=bf16``).
- open_clip's trainer runs in its own virtual environment (``.bench/openclip-venv``, made here
  if missing) that pins the webdataset its ``[training]`` extra asks for (<= 0.2.86) and
  takes everything else (torch, open_clip) from this one.
- Both: one process, ``--workers``/``data.num_workers`` loader processes, no gradient
  clipping, one epoch of ``samples / batch`` steps, no evaluation, no checkpoint in between.
- Throughput: the median over log lines, after the first quarter of the steps, of each
  trainer's own mean over the steps since its last line (open_clip: the batch over its
  ``Batch (t)``, the window's mean step time; its ``/s/gpu`` is the last step's alone, which
  earlier versions of this script took; clipfnd: ``samples_per_sec`` of ``metrics.jsonl``),
  a line every ``--log-every`` steps in both. Peak memory: the
  peak resident set of the trainer process.

- Where the time goes: each trainer's own data-wait and step times (open_clip's
  ``data_time``/``batch_time`` from its log lines, clipfnd's from ``metrics.jsonl``), the
  share of the step spent waiting for the loader printed as ``wait``.
- On ``--device cuda``: peak GPU memory (``nvidia-smi``, polled) and MFU: model FLOPs a
  sample (``torch.utils.flop_counter``, forward of both towers, times 3 for the backward)
  times samples/s over the GPU's dense bf16 (or fp32) peak.

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

import torch

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
PEAK_GPU = (  # the same, and the GPU's memory in use, polled every 200 ms
    "import resource, subprocess, sys; q = subprocess.Popen(['nvidia-smi', "
    "'--query-gpu=memory.used', '--format=csv,noheader,nounits', '-lms', '200'], "
    "stdout=subprocess.PIPE, text=True); p = subprocess.run(sys.argv[1:]); q.terminate(); "
    "used = [int(x) for x in q.communicate()[0].split() if x.isdigit()]; "
    "print('PEAK_GPU_MIB', max(used, default=-1), flush=True); "
    "print('PEAK_KIB', resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, flush=True); "
    "sys.exit(p.returncode)"
)
# dense peak FLOP/s (bf16 tensor cores, fp32 without TF32) by GPU name, from NVIDIA's sheets
GPU_PEAKS = {"H100": (989e12, 67e12), "H200": (989e12, 67e12), "A100": (312e12, 19.5e12)}


def sh(cmd: list[str], **kw) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, check=True, text=True, **kw)


def model_and_data(model: str, samples: int, shard_size: int = 512) -> tuple[str, Path]:
    """The model's name for both trainers (``tiny``: the small ViT's ``local-dir:`` folder)
    and synthetic shards of ``samples`` at its side, made once under ``.bench/``."""
    name = model
    if model == "tiny":
        model_dir = BENCH / "model"
        model_dir.mkdir(parents=True, exist_ok=True)
        (model_dir / "open_clip_config.json").write_text(
            json.dumps({"model_cfg": MODEL, "preprocess_cfg": {}}, indent=2)
        )
        name = f"local-dir:{model_dir}"
    size = 64 if model == "tiny" else 256
    data = BENCH / f"data_{samples}_{size}px"
    if not (data / "train" / "manifest.json").exists():
        sh(
            [sys.executable, "-m", "clipfnd", "data", "synthetic", "--out", str(data)]
            + ["--num-samples", str(samples), "--num-val", "0", "--image-size", str(size)]
            + ["--num-concepts", "64", "--shard-size", str(shard_size)],
            capture_output=True,
        )
    return name, data


def prepare(a: argparse.Namespace) -> tuple[str, Path, int]:
    """The model's name for both trainers, the training shards and their count; open_clip's
    virtual environment made if missing."""
    model, data = model_and_data(a.model, a.samples)
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
    return model, data / "train", shards


def run_open_clip(a, model: str, train: Path, shards: int, i: int) -> dict:
    logs = BENCH / "logs"
    name = f"oc_{os.getpid()}_{i}"
    cmd = [str(VENV / "bin" / "python"), "-m", "open_clip_train.main"]
    cmd += ["--dataset-type", "webdataset", "--train-data"]
    cmd += [str(train / f"shard-{{000000..{shards - 1:06d}}}.tar")]
    cmd += ["--train-num-samples", str(a.samples), "--batch-size", str(a.batch), "--epochs", "1"]
    precision = "amp_bf16" if a.precision == "bf16" else "fp32"
    cmd += ["--workers", str(a.workers), "--model", model, "--precision", precision]
    cmd += ["--lr", "1e-3", "--warmup", "4", "--wd", "0.1", "--log-every-n-steps", str(a.log_every)]
    cmd += ["--logs", str(logs), "--name", name, "--save-frequency", "0", "--seed", "0"]
    cmd += ["--report-to", "", "--device", a.device]
    out = sh([sys.executable, "-c", _peak_wrapper(a), *cmd], capture_output=True, env=_env(a))
    text = out.stdout + out.stderr
    times = re.findall(r"Data \(t\): ([0-9.]+) Batch \(t\): ([0-9.]+)", text)
    if not times:
        raise RuntimeError("open_clip printed no step times:\n" + text[-3000:])
    # its "/s/gpu" is the last step's alone; the window's mean step time, as clipfnd's
    # samples_per_sec is over its window, is the batch over "Batch (t)" (the window's mean)
    rates = [a.batch / float(b) for _, b in times]
    return {
        "samples_per_sec": _steady(rates),
        "wait": _steady([float(d) / float(b) for d, b in times]) if times else float("nan"),
        **_peak(text),
    }


def run_clipfnd(a, model: str, train: Path, i: int, extra: list[str]) -> dict:
    run = BENCH / "runs" / f"cf_{os.getpid()}_{i}"
    cmd = [sys.executable, "-m", "clipfnd", "train", str(ROOT / "configs" / "demo.yaml")]
    cmd += [f"model.name={model}", f"data.train={train}", "data.val=null"]
    cmd += ["train.mixed_precision=bf16"] if a.precision == "bf16" else []
    cmd += [f"data.batch_size={a.batch}", f"data.num_workers={a.workers}", "optim.grad_clip=null"]
    cmd += ["optim.warmup_steps=4", "train.epochs=1", f"train.log_every={a.log_every}"]
    cmd += ["train.progress=false"]
    cmd += ["train.report_to=none", "train.plots=false", "train.checkpoint_every=0"]
    cmd += ["eval.at_end=false", "fnd.detector=none", f"output_dir={run}", "overwrite=true"]
    out = sh(
        [sys.executable, "-c", _peak_wrapper(a), *cmd, *extra], capture_output=True, env=_env(a)
    )
    recs = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in recs if "samples_per_sec" in r]
    return {
        "samples_per_sec": _steady([r["samples_per_sec"] for r in steps]),
        "wait": _steady([r["data_time"] / r["batch_time"] for r in steps]),
        **_peak(out.stdout),
    }


def _env(a) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": str(os.cpu_count() or 2)}
    if a.device == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def _peak_wrapper(a) -> str:
    return PEAK_GPU if a.device == "cuda" else PEAK


def _steady(rates: list[float]) -> float:
    return statistics.median(rates[len(rates) // 4 :] or rates)


def _peak(text: str) -> dict:
    m = re.findall(r"PEAK_KIB (\d+)", text)
    g = re.findall(r"PEAK_GPU_MIB (-?\d+)", text)
    out = {"peak_mib": int(m[-1]) / 1024 if m else float("nan")}
    if g:
        out["peak_gpu_mib"] = float(g[-1])
    return out


def flops_per_sample(model: str) -> float:
    """Training FLOPs a sample: the forward of both towers (``torch.utils.flop_counter``),
    times 3 (the backward costs about twice the forward)."""
    import open_clip
    from torch.utils.flop_counter import FlopCounterMode

    sys.path.insert(0, str(ROOT))
    from clipfnd.models.factory import register_builtin_configs

    register_builtin_configs()
    m = open_clip.create_model(model)
    size = m.visual.image_size
    size = size if isinstance(size, (tuple, list)) else (size, size)
    image = torch.zeros(1, 3, *size)
    text = torch.zeros(1, m.context_length, dtype=torch.long)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        m(image, text)
    return 3.0 * counter.get_total_flops()


def gpu_peak(precision: str) -> tuple[str, float | None]:
    """The GPU's name and its dense peak FLOP/s at ``precision`` (None: not in the table)."""
    name = (
        subprocess.run(
            ["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"],
            capture_output=True,
            text=True,
        )
        .stdout.strip()
        .splitlines()[0]
    )
    for key, (bf16, fp32) in GPU_PEAKS.items():
        if key in name:
            return name, bf16 if precision == "bf16" else fp32
    return name, None


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
    p.add_argument("--model", default="tiny", help="tiny (default) or an open_clip model name")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    p.add_argument("--settings", nargs="+", default=None, help="which of the settings to run")
    p.add_argument("--out", default=None, help="also write the medians to this JSON file")
    a = p.parse_args()
    model, train, shards = prepare(a)
    settings = {
        "open_clip": lambda i: run_open_clip(a, model, train, shards, i),
        "clipfnd": lambda i: run_clipfnd(a, model, train, i, []),
        "clipfnd+glofnd": lambda i: run_clipfnd(
            a,
            model,
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
            model,
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
            a, model, train, i, ["train.compile=true"]
        )
    if a.settings:
        unknown = set(a.settings) - set(settings)
        if unknown:
            p.error(f"unknown settings {sorted(unknown)}; choose from {list(settings)}")
        settings = {k: v for k, v in settings.items() if k in a.settings}
    got: dict[str, list[dict]] = {k: [] for k in settings}
    names = list(settings)
    for r in range(a.rounds):
        for name in names if r % 2 == 0 else names[::-1]:
            got[name].append(settings[name](r))
            print(f"round {r}: {name} {got[name][-1]['samples_per_sec']:.1f} samples/s", flush=True)
    med = {k: statistics.median(x["samples_per_sec"] for x in v) for k, v in got.items()}
    mem = {k: statistics.median(x["peak_mib"] for x in v) for k, v in got.items()}
    wait = {k: statistics.median(x["wait"] for x in v) for k, v in got.items()}
    gpu_mem = {k: max(x.get("peak_gpu_mib", -1) for x in v) for k, v in got.items()}
    what = "small ViT (128 wide, 4+4 layers, 64 px)" if a.model == "tiny" else a.model
    print(
        f"\n{what}, batch {a.batch}, {a.precision}, {a.device}, {a.samples // a.batch} steps, "
        f"{a.workers} loader worker(s), {a.rounds} rounds, {os.cpu_count()} CPUs"
    )
    mfu: dict[str, float] = {}
    if a.device == "cuda":
        name, peak = gpu_peak(a.precision)
        flops = flops_per_sample(model)
        print(f"{name}: {flops / 1e9:.1f} GFLOP a training sample, peak {peak or float('nan'):.3g}")
        if peak:
            mfu = {k: med[k] * flops / peak for k in med}
    print(f"{'trainer':<28} {'samples/s':>10} {'peak MiB':>9} {'wait':>6} {'ratio':>22}", end="")
    print(f" {'GPU MiB':>8} {'MFU':>6}" if a.device == "cuda" else "")
    for k in names:
        base = {"open_clip": None, "clipfnd": "open_clip", "clipfnd+compile": "open_clip"}.get(
            k, "clipfnd"
        )
        ratio = f"{med[k] / med[base]:.3f} vs {base}" if base in med else ""
        line = f"{k:<28} {med[k]:>10.1f} {mem[k]:>9.0f} {wait[k]:>6.1%} {ratio:>22}"
        if a.device == "cuda":
            line += f" {gpu_mem[k]:>8.0f} {mfu.get(k, float('nan')):>6.1%}"
        print(line)
    if a.out:
        Path(a.out).write_text(
            json.dumps(
                {
                    "args": vars(a),
                    "samples_per_sec": got,
                    "median": med,
                    "wait": wait,
                    "mfu": mfu,
                    "gpu_mib": gpu_mem,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
