"""Parameter and optimiser memory per process under FSDP2 against DDP, at 1, 2 and 4 CPU
processes (gloo), for an open_clip model (default ViT-B-32).

Each process builds the model, prepares it with Accelerate (DDP, or FSDP2 through clipfnd's
build: the blocks each tower repeats sharded one by one, the rest with the root), takes one
AdamW step on a small random batch, and counts the bytes this process holds of the parameters
and of the optimiser state (a sharded tensor counts its local shard). The largest count over
the processes is printed; under FSDP it should fall about as 1/W, under DDP stay flat.

    python benchmarks/fsdp_memory.py [--model ViT-B-32] [--worlds 1 2 4]

Writes ``benchmarks/fsdp_memory.json`` and prints a Markdown table.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _local_bytes(tensors) -> int:
    total = 0
    for t in tensors:
        t = t.to_local() if hasattr(t, "to_local") else t
        total += t.numel() * t.element_size()
    return total


def worker(model_name: str, out: str) -> None:
    import torch
    from accelerate import Accelerator

    from clipfnd import distributed
    from clipfnd.methods import TemperaturePolicy
    from clipfnd.models import create_clip
    from clipfnd.train.build import _fsdp_on_cpu, _prepare_for_fsdp, param_groups
    from clipfnd.train.sharded import is_sharded

    acc = Accelerator(cpu=True)
    _fsdp_on_cpu(acc)
    torch.manual_seed(0)
    bundle = create_clip(model_name)
    model = bundle.model
    policy = TemperaturePolicy()
    if is_sharded(acc):
        _prepare_for_fsdp(model, acc)
    opt = torch.optim.AdamW(param_groups(model, 0.1, policy), lr=1e-4)
    model, opt = acc.prepare(model, opt)
    size = bundle.preprocess_val.transforms[0].size
    size = size if isinstance(size, int) else size[0]
    image = torch.randn(2, 3, size, size)
    text = bundle.tokenizer(["a photo", "a drawing"])
    t0 = time.perf_counter()
    o = model(image=image, text=text)
    loss = (o["image_features"] @ o["text_features"].T).mean()
    acc.backward(loss)
    opt.step()
    opt.zero_grad(set_to_none=True)
    step_seconds = time.perf_counter() - t0
    params = _local_bytes(p.detach() for p in model.parameters())
    states = [
        v
        for st in opt.optimizer.state.values()
        for v in st.values()
        if torch.is_tensor(v) and v.dim() > 0
    ]
    optim = _local_bytes(states)
    counts = torch.tensor([params, optim, params + optim], dtype=torch.float64)
    largest = counts.clone()
    if distributed.is_distributed():
        torch.distributed.all_reduce(largest, op=torch.distributed.ReduceOp.MAX)
    if acc.is_main_process:
        Path(out).write_text(
            json.dumps(
                {
                    "params_mib": largest[0].item() / 2**20,
                    "optimizer_mib": largest[1].item() / 2**20,
                    "total_mib": largest[2].item() / 2**20,
                    "step_seconds": step_seconds,
                }
            )
        )
    acc.end_training()


def run(model_name: str, world: int, fsdp: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.json"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        if fsdp:
            env |= {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2"}
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={world}"]
        cmd += [__file__, "--worker", "--model", model_name, "--out", str(out)]
        subprocess.run(cmd, env=env, check=True, cwd=ROOT, capture_output=True, text=True)
        return json.loads(out.read_text())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="ViT-B-32")
    ap.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "fsdp_memory.json"))
    a = ap.parse_args()
    if a.worker:
        worker(a.model, a.out)
        return
    rows = []
    for world in a.worlds:
        for fsdp in (False, True):
            if world == 1 and fsdp:
                continue  # one process holds everything either way
            r = run(a.model, world, fsdp) | {"world": world, "sharding": "fsdp" if fsdp else "ddp"}
            rows.append(r)
            print(json.dumps(r), flush=True)
    Path(a.out).parent.mkdir(parents=True, exist_ok=True)
    Path(a.out).write_text(json.dumps({"model": a.model, "rows": rows}, indent=1) + "\n")
    base = next(r["total_mib"] for r in rows if r["world"] == 1)
    print(f"\n{a.model}: parameters + AdamW state held by the largest process (MiB)\n")
    print("| processes | sharding | parameters | optimiser | total | share of 1 process |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['world']} | {r['sharding']} | {r['params_mib']:.0f} | {r['optimizer_mib']:.0f} "
            f"| {r['total_mib']:.0f} | {r['total_mib'] / base:.2f} |"
        )


if __name__ == "__main__":
    main()
