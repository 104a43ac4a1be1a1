"""``clipfnd eval`` and ``clipfnd export`` sub-commands.

    clipfnd eval --checkpoint RUN_OR_CHECKPOINT --task retrieval|zeroshot|linear-probe|knn
                 --data PATH [--train-data PATH] [--out results.json]
    accelerate launch [flags] -m clipfnd eval ...      (each process a slice of the data)
    clipfnd export --checkpoint RUN_OR_CHECKPOINT --format open_clip|hf|timm|torchvision --out DIR [--verify]

See docs/evaluation.md.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from data_pipelines.offline import stay_offline

from ..errors import UserError


def cmd_eval(a: argparse.Namespace) -> int:
    from clipfnd_eval.processes import finish_processes, setup_processes
    from clipfnd_eval.run import EvalOptions, run_eval

    stay_offline()
    opts = EvalOptions(
        task=a.task,
        data=a.data,
        train_data=a.train_data,
        split=a.split,
        train_split=a.train_split,
        classnames=a.classnames,
        templates=a.templates,
        batch_size=a.batch_size,
        num_workers=a.num_workers,
        image_column=a.image_column,
        caption_column=a.caption_column,
        label_column=a.label_column,
        k=a.k,
        temperature=a.temperature,
        device=a.device,
        progress=not a.no_progress,
    )
    out = Path(a.out) if a.out else None
    if out is not None:
        check_writable(out)  # before the encoding, not after it
    if (a.checkpoint is None) == (a.model is None):
        raise UserError(
            "give --checkpoint (a run or checkpoint) or --model (a stock model), not both"
        )
    if a.pretrained is not None and a.model is None:
        raise UserError("--pretrained goes with --model (a checkpoint holds its own weights)")
    target = a.checkpoint
    if a.model is not None:
        from clipfnd_eval.run import EvalModel

        from ..models import create_clip

        bundle = create_clip(a.model, pretrained=a.pretrained)
        bundle.model.eval()
        target = EvalModel(bundle, {"model_name": a.model, "pretrained": a.pretrained})
    processes = setup_processes(a.device)
    try:
        results = run_eval(target, opts, processes)
    finally:
        finish_processes()
    if processes.is_main:
        text = json.dumps(results, indent=2, sort_keys=True)
        print(text, flush=True)  # printed first: a failed write loses nothing
        if out is not None:
            try:
                tmp = out.with_name(out.name + ".tmp")
                tmp.write_text(text + "\n")
                tmp.replace(out)
            except OSError as e:
                raise UserError(
                    f"--out {out}: cannot write the results ({e.strerror or e}); they are "
                    "printed above"
                ) from e
    return 0


def check_writable(out: Path) -> None:
    """Refuse an ``--out`` path that cannot be written, with a one-line message."""
    if out.is_dir():
        raise UserError(f"--out {out} is a folder; give a file name, e.g. {out / 'results.json'}")
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        # one probe per process: several processes of one evaluation check the same --out
        probe = out.with_name(f".{out.name}.{os.getpid()}.probe")
        probe.write_text("")
        probe.unlink(missing_ok=True)
    except OSError as e:
        raise UserError(f"--out {out}: cannot write there ({e.strerror or e})") from e


def cmd_export(a: argparse.Namespace) -> int:
    from ..export import export_checkpoint

    stay_offline()
    result = export_checkpoint(
        a.checkpoint, a.format, a.out, verify=a.verify, tolerance=a.tolerance, overwrite=a.overwrite
    )
    print(
        f"exported {result.source['checkpoint']} (step {result.source['step']}, "
        f"{result.source['model_name']}) as {result.format} to {result.out}"
    )
    print(f"files: {', '.join(result.files)}")
    if result.comparison is not None:
        for name, diff in result.comparison.diffs.items():
            print(f"verify: {name} max abs diff {diff:.3g}")
        print(f"verify: passed (tolerance {result.comparison.tolerance:g})")
    sys.stdout.flush()
    return 0


def add_parsers(sub: argparse._SubParsersAction) -> None:
    """Register the eval and export sub-commands (heavy imports wait until a command runs)."""
    e = sub.add_parser(
        "eval",
        help="evaluate a checkpoint (retrieval, zero-shot, probe, kNN)",
        description="Evaluate a checkpoint. See docs/evaluation.md.",
    )
    e.add_argument(
        "--checkpoint",
        default=None,
        help="a run directory (its newest checkpoint) or a checkpoint directory",
    )
    e.add_argument(
        "--model",
        default=None,
        help="instead of --checkpoint: a stock open_clip model (e.g. ViT-B-32, with "
        "--pretrained), hf-hub:org/repo, or local-dir:DIR (an export of `clipfnd export`)",
    )
    e.add_argument(
        "--pretrained",
        default=None,
        help="with --model: an open_clip pretrained tag (from the Hugging Face cache) or a "
        "weights file",
    )
    e.add_argument(
        "--task", required=True, choices=["retrieval", "zeroshot", "linear-probe", "knn"]
    )
    e.add_argument(
        "--data",
        required=True,
        help="clipfnd shard folder, clip_benchmark WebDataset root, CSV/TSV file, "
        "or local Hugging Face dataset (save_to_disk folder / parquet)",
    )
    e.add_argument(
        "--split", default=None, help="split of a clip_benchmark root or HF dataset (default: test)"
    )
    e.add_argument("--train-data", default=None, help="linear-probe/knn: the data to fit on")
    e.add_argument("--train-split", default=None, help="split of --train-data (default: train)")
    e.add_argument("--out", default=None, help="also write the results to this JSON file")
    e.add_argument(
        "--classnames",
        default=None,
        help="zeroshot: file with one class name a line, or 'imagenet' "
        "(default: the dataset's own)",
    )
    e.add_argument(
        "--templates",
        default=None,
        help="zeroshot: file with one template a line ({c} for the class name), or "
        "'openai' / 'simple' (default: the dataset's own, else a small set)",
    )
    e.add_argument("--batch-size", type=int, default=256)
    e.add_argument("--num-workers", type=int, default=2, help="loader processes per process")
    e.add_argument("--image-column", default=None, help="csv/hf: column with the image")
    e.add_argument("--caption-column", default=None, help="csv/hf: column with the caption(s)")
    e.add_argument("--label-column", default=None, help="csv/hf: column with the label")
    e.add_argument("--k", type=int, default=20, help="knn: neighbours")
    e.add_argument("--temperature", type=float, default=0.07, help="knn: vote weight exp(s/T)")
    e.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    e.add_argument("--no-progress", action="store_true", help="no progress bar")
    e.set_defaults(func=cmd_eval)

    x = sub.add_parser(
        "export",
        help="convert a checkpoint for open_clip, transformers or timm",
        description="Export a checkpoint's model. See docs/evaluation.md.",
    )
    x.add_argument(
        "--checkpoint",
        required=True,
        help="a run directory (its newest checkpoint) or a checkpoint directory",
    )
    x.add_argument(
        "--format",
        required=True,
        choices=["open_clip", "hf", "timm", "torchvision"],
        help="open_clip, hf (transformers) or timm (image tower) for a CLIP checkpoint; "
        "timm or torchvision (the backbone's state dict) for a vision-only checkpoint",
    )
    x.add_argument("--out", required=True, help="output folder (created; must be empty)")
    x.add_argument(
        "--verify",
        action="store_true",
        help="load the export with the target library and compare embeddings",
    )
    x.add_argument(
        "--tolerance",
        type=float,
        default=1e-4,
        help="--verify: largest allowed absolute embedding difference",
    )
    x.add_argument("--overwrite", action="store_true", help="replace an earlier export in --out")
    x.set_defaults(func=cmd_export)
