"""The loader alone, on shards like img2dataset's (256 px JPEGs, quality 90), with a model's
training transform: clipfnd's ``ShardStream`` beside a plain webdataset pipeline like
open_clip's (``open_clip_train/data.py``: tar samples, shuffle, ``decode("pilrgb")``, the
transform and the tokenizer per sample, ``batched``, ``WebLoader``).

    python benchmarks/loader.py [--samples 4096] [--batch 128] [--workers 1] [--rounds 3]
                                [--model ViT-B-32] [--image-size 256] [--dir DIR] [--quick]

Settings, each run in its own Python process, rounds alternating the order:
- ``webdataset``: the plain pipeline with open_clip's ``preprocess_train`` (float images);
- ``clipfnd, float``: ``ShardStream`` with the same ``preprocess_train`` (images float32,
  normalised in the worker);
- ``clipfnd, uint8``: ``ShardStream`` with ``data_pipelines.pixels.fast_transform`` of it:
  one crop-and-resize, uint8 images handed over, normalised by the consumer (here in the main
  process, as training on a CPU does; on a GPU it runs there);
- ``clipfnd, uint8 + draft``: the same, JPEGs decoded at reduced size where the crop allows
  (only images at least twice the model's side gain: not 256 px shards for a 224 px model).

Each setting reads ``--samples`` samples after a first batch (worker start-up) and reports
samples/s (wall) and samples per CPU second over all its processes (main process and
workers, from ``/proc`` over the same window): the cost per sample the loader asks of the
machine's cores. The images are smooth random fields with noise on top (about
the bytes per pixel of photos), a few hundred distinct ones.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import random
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

from clipfnd.testing.shards import photo_jpeg  # noqa: E402

SETTINGS = ("webdataset", "clipfnd, float", "clipfnd, uint8", "clipfnd, uint8 + draft")


def write_shards(root: Path, n: int, size: int, per_shard: int = 512) -> None:
    """img2dataset's layout: ``00000.tar`` with ``000000123.jpg``/``.txt``/``.json``."""
    root.mkdir(parents=True, exist_ok=True)
    rng = random.Random(0)
    images = [photo_jpeg(rng.getrandbits(32), (size, size)) for _ in range(256)]
    words = ["a", "photo", "of", "the", "red", "small", "dog", "on", "grass", "city", "at", "night"]
    for s in range(0, n, per_shard):
        with tarfile.open(root / f"{s // per_shard:05d}.tar", "w") as tar:
            for i in range(s, min(n, s + per_shard)):
                key = f"{s // per_shard:05d}{i % per_shard:04d}"
                caption = " ".join(rng.choice(words) for _ in range(rng.randint(5, 16)))
                meta = {"url": f"https://example.com/{i}.jpg", "caption": caption}
                for ext, data in (
                    ("jpg", images[i % len(images)]),
                    ("txt", caption.encode()),
                    ("json", json.dumps(meta).encode()),
                ):
                    info = tarfile.TarInfo(f"{key}.{ext}")
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))


def run_setting(a: argparse.Namespace, setting: str) -> None:
    """(Child process.) Read the samples and print one JSON line of wall time and count."""
    import open_clip
    import torch

    torch.set_num_threads(1)
    _, preprocess, _ = open_clip.create_model_and_transforms(a.model)
    tokenizer = open_clip.get_tokenizer(a.model)
    shards = Path(a.dir) / "shards"
    if setting == "webdataset":
        import webdataset as wds

        urls = [str(p) for p in sorted(shards.glob("*.tar"))]
        pipeline = wds.DataPipeline(
            wds.SimpleShardList(urls),
            wds.split_by_worker,
            wds.tarfile_to_samples(handler=wds.warn_and_continue),
            wds.shuffle(1000, initial=1000),
            wds.decode("pilrgb", handler=wds.warn_and_continue),
            wds.rename(image="jpg;png;jpeg;webp", text="txt"),
            wds.map_dict(image=preprocess, text=lambda t: tokenizer(t)[0]),
            wds.to_tuple("image", "text"),
            wds.batched(a.batch, partial=False),
        )
        loader = wds.WebLoader(pipeline, batch_size=None, num_workers=a.workers)
        batches = ((x, t) for x, t in loader)
    else:
        from data_pipelines.loader import ShardStream
        from data_pipelines.pixels import REDUCING_GAP, fast_transform
        from data_pipelines.shards import load_shard_set

        transform = preprocess
        if setting != "clipfnd, float":
            gap = REDUCING_GAP if setting.endswith("draft") else None
            transform = fast_transform(preprocess, reducing_gap=gap)
        stream = ShardStream(
            load_shard_set(a.dir),
            global_batch_size=a.batch,
            image_transform=transform,
            tokenize=tokenizer,
            num_workers=a.workers,
            shuffle_buffer=1000,
        )
        norm = getattr(transform, "normalize", None)
        batches = (
            (norm(b["image"]) if norm is not None else b["image"], b["text"])
            for b in stream.epoch(0)
        )
    n, t0, cpu0, main0 = 0, None, 0.0, 0.0
    for x, _ in batches:
        assert x.dtype == torch.float32 and x.shape[-1] == preprocess.transforms[0].size[0]
        if t0 is None:  # after the first batch: workers started
            t0, (cpu0, main0) = time.perf_counter(), tree_cpu_seconds()
            continue
        n += x.shape[0]
        if n >= a.samples:
            break
    wall, (cpu, main) = time.perf_counter() - t0, tree_cpu_seconds()
    del batches
    out = {"n": n, "wall": wall, "cpu": cpu - cpu0, "main": main - main0}
    print(json.dumps(out), flush=True)


def tree_cpu_seconds() -> tuple[float, float]:
    """User + system CPU seconds of this process and every live descendant, and of this
    process alone (loader workers
    started by a fork server are not children, so ``getrusage`` would miss them), from
    ``/proc``."""
    parent, cpu = {}, {}
    tick = os.sysconf("SC_CLK_TCK")
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        parent[int(d)] = int(fields[1])
        cpu[int(d)] = (int(fields[11]) + int(fields[12])) / tick
    me, total = os.getpid(), 0.0
    for pid in cpu:
        p = pid
        while p in parent and p != me:
            p = parent[p]
        if p == me:
            total += cpu[pid]
    return total, cpu[me]


def measure(a: argparse.Namespace, setting: str) -> dict[str, float]:
    """One setting in a fresh process; its CPU time is that of the whole process tree."""
    cmd = [sys.executable, __file__, "--child", setting, *sys.argv[1:]]
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    out = subprocess.run(cmd, check=True, capture_output=True, text=True, env=env)
    r = json.loads(out.stdout.strip().splitlines()[-1])
    workers = r["cpu"] - r["main"]
    return {
        "per_s": r["n"] / r["wall"],
        "per_cpu_s": r["n"] / r["cpu"],
        "per_worker_cpu_s": r["n"] / max(workers, 1e-9),
        "main_ms": 1e3 * r["main"] / r["n"],
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--samples", type=int, default=4096)
    p.add_argument("--batch", type=int, default=128)
    p.add_argument("--workers", type=int, default=1)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--model", default="ViT-B-32")
    p.add_argument("--image-size", type=int, default=256)
    p.add_argument("--dir", default=None, help="where the shards go (kept when given)")
    p.add_argument("--quick", action="store_true", help="512 samples, one round")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.quick:
        a.samples, a.rounds = 512, 1
    if a.child:
        run_setting(a, a.child)
        return
    tmp = None if a.dir else tempfile.mkdtemp(prefix="loader_bench_")
    a.dir = a.dir or tmp
    sys.argv += ["--dir", a.dir] if tmp else []
    try:
        root = Path(a.dir)
        n = a.samples + 2 * a.batch + 1000  # the shuffle buffer's fill, the first batch
        if not (root / "manifest.json").is_file():
            sys.path.insert(0, str(ROOT))
            from data_pipelines.index import index_shards

            write_shards(root / "shards", n, a.image_size)
            index_shards([str(root / "shards")], root / "manifest.json", progress=False)
        results: dict[str, list[dict[str, float]]] = {s: [] for s in SETTINGS}
        for r in range(a.rounds):
            order = SETTINGS if r % 2 == 0 else SETTINGS[::-1]
            for s in order:
                results[s].append(measure(a, s))
                m = results[s][-1]
                print(
                    f"round {r + 1} {s:>24}: {m['per_s']:7.1f} samples/s, "
                    f"{m['per_worker_cpu_s']:6.1f} per worker CPU s, "
                    f"{m['per_cpu_s']:6.1f} per CPU s (all)",
                    flush=True,
                )
        keys = ("per_s", "per_worker_cpu_s", "per_cpu_s")
        base = {k: statistics.median(x[k] for x in results["webdataset"]) for k in keys}
        print(
            f"\n{a.model} training transform, {a.image_size} px JPEG q90, batch {a.batch}, "
            f"{a.workers} worker(s), {a.samples} samples, {a.rounds} round(s): medians "
            "(ratios to webdataset; spread of samples/s over rounds)"
        )
        print(
            f"{'setting':>24} {'samples/s':>15} {'per worker CPU s':>17} {'per CPU s (all)':>16} "
            f"{'main ms/sample':>15}  spread"
        )
        for s in SETTINGS:
            med = {k: statistics.median(x[k] for x in results[s]) for k in (*keys, "main_ms")}
            cells = [f"{med[k]:7.0f} ({med[k] / base[k]:4.2f}x)" for k in keys]
            ps = [x["per_s"] for x in results[s]]
            print(
                f"{s:>24} {cells[0]:>15} {cells[1]:>17} {cells[2]:>16} {med['main_ms']:15.2f}  "
                f"{min(ps):.0f}-{max(ps):.0f}"
            )
    finally:
        if tmp:
            import shutil

            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
