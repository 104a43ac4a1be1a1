"""How long ``clipfnd data index`` takes on img2dataset-shaped shards, beside reading every
byte of the same shards with webdataset's tar reader (what a count by streaming costs).

    python benchmarks/index_shards.py [--shards 100] [--per-shard 1000] [--image-size 96]
                                      [--workers 2] [--rounds 3] [--dir DIR]

The shards are written once into ``--dir`` (default: a temporary folder, removed after) by
``clipfnd/testing/shards.py``: keys like ``000010023``, ``.jpg``/``.txt``/``.json`` with url,
caption and status, one sample in four unusable (a failed download without an image, an
empty caption, a zero-byte image), a ``_stats.json`` per shard; the JPEGs are noise, so their
bytes are about the size of real photos. Rounds alternate the order of the three settings
(index with ``--workers`` processes, index with one, stream every byte with one) and the
script prints the median of each and the ratios. The files are in the page cache after the
first round, so the figures are the CPU cost, not the disk's.
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

import webdataset as wds  # noqa: E402

from clipfnd.testing.shards import write_shards  # noqa: E402
from data_pipelines.index import index_shards  # noqa: E402


def stream_all(files: list[Path]) -> int:
    n = 0
    for f in files:
        with open(f, "rb") as stream:
            members = wds.tariterators.tar_file_iterator(stream)
            tagged = ({**m, "__url__": str(f)} for m in members)
            n += sum(1 for _ in wds.tariterators.group_by_keys(tagged))
    return n


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--shards", type=int, default=100)
    p.add_argument("--per-shard", type=int, default=1000)
    p.add_argument("--image-size", type=int, default=96)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dir", default=None, help="where the shards go (kept when given)")
    a = p.parse_args()
    tmp = None if a.dir else tempfile.mkdtemp(prefix="index_bench_")
    root = Path(a.dir or tmp)
    try:
        shards = root / "shards"
        if not (shards / f"{a.shards - 1:05d}.tar").is_file():
            t0 = time.perf_counter()
            usable = write_shards(
                shards, a.shards, a.per_shard, image_size=a.image_size, noise=True
            )
            print(
                f"wrote {a.shards} shards, {usable} usable samples, in {time.perf_counter() - t0:.0f} s"
            )
        files = sorted(shards.glob("*.tar"))
        size = sum(f.stat().st_size for f in files)
        print(f"{len(files)} shards of {a.per_shard} samples, {size / 2**20:.0f} MiB")
        settings = {
            f"index, {a.workers} processes": lambda: index_shards(
                [str(shards)], root / "m.json", workers=a.workers, progress=False
            )["num_samples"],
            "index, 1 process": lambda: index_shards(
                [str(shards)], root / "m.json", workers=1, progress=False
            )["num_samples"],
            "stream every byte, 1 process": lambda: stream_all(files),
        }
        times: dict[str, list[float]] = {k: [] for k in settings}
        for r in range(a.rounds):
            names = list(settings) if r % 2 == 0 else list(reversed(settings))
            for name in names:
                t0 = time.perf_counter()
                n = settings[name]()
                times[name].append(time.perf_counter() - t0)
                print(f"round {r}: {name}: {times[name][-1]:.2f} s ({n} samples)", flush=True)
        base = statistics.median(times["stream every byte, 1 process"])
        print(f"\n{'setting':<32}{'median s':>10}{'samples/s':>12}{'vs streaming':>14}")
        total = a.shards * a.per_shard
        for name, ts in times.items():
            m = statistics.median(ts)
            print(f"{name:<32}{m:>10.2f}{total / m:>12.0f}{base / m:>13.2f}x")
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
