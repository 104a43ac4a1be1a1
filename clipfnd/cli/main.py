"""The ``clipfnd`` command (also ``python -m clipfnd``).

clipfnd data synthetic --out DIR --num-samples N [--num-val M] [--seed S] [--shard-size K]
clipfnd data digits --out DIR
clipfnd data build --from csv|imagefolder|hf --input PATH --out DIR
clipfnd data index SOURCE... --out MANIFEST.json     (shards made elsewhere, e.g. img2dataset)
clipfnd data verify DIR_OR_MANIFEST
clipfnd train CONFIG.yaml [key=value ...]            (clipfnd train --help: every config key)
accelerate launch [flags] -m clipfnd train CONFIG.yaml [key=value ...]
clipfnd eval --checkpoint RUN_OR_CHECKPOINT --task retrieval --data PATH
clipfnd export --checkpoint RUN_OR_CHECKPOINT --format open_clip|hf|timm --out DIR
clipfnd report RUN [--checkpoint STEP] [--data SPLIT] [--out report.html]
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
import time
from pathlib import Path


def _setup_logging() -> None:
    """Warnings from everyone; clipfnd's own progress messages (INFO) from rank 0."""
    rank = int(os.environ.get("RANK", "0"))
    logging.basicConfig(
        level=logging.WARNING,
        format=f"%(asctime)s [rank {rank}] %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    for ours in ("clipfnd", "data_pipelines", "eval"):
        logging.getLogger(ours).setLevel(logging.INFO if rank == 0 else logging.WARNING)
    from data_pipelines.urls import RedactingFilter

    # open_clip warns on the root logger for every model built without weights, which is
    # how clipfnd always builds a model before loading its own checkpoint into it. No line
    # reaches the console with a credential in it (data_pipelines.urls.redact).
    for handler in logging.getLogger().handlers:
        handler.addFilter(lambda r: "No pretrained weights loaded" not in r.getMessage())
        handler.addFilter(RedactingFilter())


class ConfigKeysHelp(argparse.Action):
    """``clipfnd train --help``: the usage, then every config key with its default and what it
    is, from the schema (built only when asked: the schema imports torch)."""

    def __init__(self, option_strings, dest=argparse.SUPPRESS, default=argparse.SUPPRESS, **kw):
        super().__init__(option_strings, dest=dest, default=default, nargs=0, **kw)

    def __call__(self, parser, namespace, values, option_string=None):
        import textwrap

        from ..config import describe_keys

        rows = describe_keys()
        width = max(len(k) for k, _, _ in rows) + 2
        lines = [
            "config keys (key default: what it is); set them in the YAML file or as key=value:",
            "",
            "  data.batch_size is the GLOBAL batch, all processes together. open_clip's "
            "--batch-size is per GPU:",
            "  data.batch_size = open_clip's --batch-size x the number of processes.",
            "",
        ]
        for key, default, text in rows:
            head = f"  {key:<{width}}{default}"
            lines.append(head)
            if text:
                lines += textwrap.wrap(text, 96, initial_indent=" " * 6, subsequent_indent=" " * 6)
        parser.epilog = "\n".join(lines)
        parser.print_help()
        parser.exit()


# --- data ----------------------------------------------------------------------------------
def cmd_data_synthetic(a: argparse.Namespace) -> int:
    from data_pipelines import synthetic
    from data_pipelines.shards import write_split

    spec = synthetic.preset_spec(
        a.preset, num_concepts=a.num_concepts, seed=a.seed, image_size=a.image_size
    )
    names = synthetic.label_names(spec)
    meta = {
        "source": "synthetic",
        "num_concepts": spec.num_concepts,
        "seed": spec.seed,
        "image_size": spec.image_size,
    }
    if a.preset:
        meta["preset"] = a.preset
    out = Path(a.out)
    summary = {}
    for split, n in (("train", a.num_samples), ("val", a.num_val)):
        if n <= 0:
            continue
        ss = write_split(
            out / split,
            synthetic.generate(spec, n, split),
            shard_size=a.shard_size,
            total=n,
            label_names=names,
            meta={**meta, "split": split},
            desc=f"synthetic {split}",
        )
        summary[split] = {
            "dir": str(out / split),
            "samples": ss.num_samples,
            "shards": ss.num_shards,
        }
    print(json.dumps(summary, indent=2))
    return 0


def cmd_data_digits(a: argparse.Namespace) -> int:
    from data_pipelines import digits

    out = Path(a.out)
    written = digits.write_splits(
        out, seed=a.seed, image_size=a.image_size, shard_size=a.shard_size
    )
    summary = {
        split: {"dir": str(out / split), "samples": ss.num_samples, "shards": ss.num_shards}
        for split, ss in written.items()
    }
    print(json.dumps(summary, indent=2))
    return 0


def cmd_data_verify(a: argparse.Namespace) -> int:
    from data_pipelines.verify import verify_split

    report = verify_split(a.dir)
    print(f"{report.root}: {report.shards} shards, {report.samples} samples read")
    for p in report.problems:
        print(f"problem: {p}")
    print("ok: the shards agree with the manifest" if report.ok else "FAILED", flush=True)
    return 0 if report.ok else 1


def cmd_data_index(a: argparse.Namespace) -> int:
    from data_pipelines import DataError
    from data_pipelines.index import index_shards

    factors = None
    if a.upsampling_factors:
        try:
            factors = [float(f) for f in a.upsampling_factors.split("::")]
        except ValueError:
            raise DataError(
                f"--upsampling-factors {a.upsampling_factors!r}: expected numbers joined by ::"
            ) from None
    t0 = time.perf_counter()
    m = index_shards(
        a.sources,
        a.out,
        images_only=a.images_only,
        label_field=a.label_field,
        upsampling_factors=factors,
        workers=a.workers,
        absolute_paths=a.absolute_paths,
        skip_unreadable=a.skip_unreadable,
        progress=not a.no_progress,
    )
    out = Path(a.out) / "manifest.json" if Path(a.out).is_dir() else Path(a.out)
    print(
        f"{out}: {m['num_samples']} usable samples in {m['num_shards']} shards "
        f"({time.perf_counter() - t0:.1f} s); skipped {m['skipped'] or 'none'}"
    )
    if m["label_names"]:
        print(f"labels from .json field {a.label_field!r}: {m['num_labels']} classes")
    for s in m["unreadable_shards"]:
        print(f"left out (unreadable): {s['file']}: {s['error']}")
    for c in m["cross_check"][:10]:
        print(f"cross-check: {c}")
    print(f"train on it: clipfnd train CONFIG data.train={out}")
    return 0


def cmd_data_build(a: argparse.Namespace) -> int:
    from data_pipelines.build import build_shards

    ss = build_shards(
        a.source,
        a.input,
        a.out,
        shard_size=a.shard_size,
        image_column=a.image_column,
        caption_column=a.caption_column,
        label_column=a.label_column,
        separator=a.separator,
        hf_split=a.hf_split,
        images_only=a.images_only,
    )
    print(
        json.dumps(
            {
                "dir": a.out,
                "samples": ss.num_samples,
                "shards": ss.num_shards,
                "labels": ss.num_labels,
            },
            indent=2,
        )
    )
    return 0


# --- train ---------------------------------------------------------------------------------
def cmd_train(a: argparse.Namespace) -> int:
    from .. import distributed
    from ..registry import load_run_config
    from ..train.loop import train

    cfg = load_run_config(a.config, a.overrides)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        signal.signal(signal.SIGTERM, _stopped_by_signal)
    try:
        summary = train(cfg)
    except KeyboardInterrupt:
        raise Interrupted(_interrupted(cfg.output_dir)) from None
    except Exception as e:
        if distributed.is_distributed() and _peer_gone(e):
            # another process stopped (its own message says why): say so in one line
            raise PeerStopped(
                f"rank {distributed.rank()}: another process of the group stopped (its own "
                "message says why); stopping too"
            ) from e
        raise
    try:
        if int(os.environ.get("RANK", "0")) == 0:
            text = print_summary(summary)
            with open(Path(summary["run_dir"]) / "train.log", "a", encoding="utf-8") as f:
                f.write(text + "\n")  # the log holds what the console showed
        distributed.shutdown()
    except KeyboardInterrupt:  # after training: the run is complete
        raise Interrupted(_interrupted(cfg.output_dir)) from None
    return 0


def _interrupted(run_dir: str) -> str:
    """What Ctrl-C left: the newest complete checkpoint (a half-written one is ``step_N.tmp``,
    which a resume never reads)."""
    from ..checkpoints import find_latest

    latest = find_latest(run_dir) if Path(run_dir).is_dir() else None
    if latest is None:
        return "interrupted; no checkpoint of this run was written yet"
    return (
        f"interrupted; the newest complete checkpoint is {latest} (resume=latest continues from it)"
    )


class Interrupted(BaseException):
    """Ctrl-C (SIGINT) during training: said in one line by rank 0, silently elsewhere."""


class PeerStopped(RuntimeError):
    """Another process of the group stopped; this one stops too, in one line."""


class Stopped(BaseException):
    """SIGTERM (the launcher stops the others when one process fails; schedulers preempt).
    A ``BaseException``, like ``KeyboardInterrupt``, so that no handler of errors takes it for
    a failure of what it interrupted."""


def _stopped_by_signal(signum, frame) -> None:
    raise Stopped(
        f"rank {os.environ.get('RANK', '0')}: stopped by SIGTERM (the launcher stops every "
        "process when one fails, whose own message says why; or a scheduler ended the job); "
        "resume=latest continues from the newest checkpoint"
    )


def _peer_gone(e: BaseException) -> bool:
    """Whether ``e`` is a collective failing because another process left the group (gloo:
    "Connection closed by peer", "Connection reset by peer"; NCCL: a remote process exited)."""
    import torch.distributed as dist

    text = str(e).lower()
    gone = ("closed by peer", "reset by peer", "broken pipe", "remote process exited")
    return isinstance(e, (dist.DistBackendError, RuntimeError)) and any(g in text for g in gone)


def print_summary(summary: dict) -> str:
    ev = summary.get("eval") or {}
    lines = [
        "",
        "=== clipfnd run summary ===",
        f"run directory     : {summary['run_dir']}",
        f"checkpoint        : {summary['checkpoint']}",
        f"steps / epochs    : {summary['steps']} / {summary['epochs']}",
        f"processes         : {summary['processes']} (global batch {summary['global_batch_size']})",
        f"samples/s         : {summary['samples_per_sec']:.1f}",
        f"final loss        : {summary['loss']:.4f}"
        if summary.get("loss") is not None
        else "final loss        : n/a",
    ]
    if summary.get("skipped_samples"):
        lines.append(f"skipped samples   : {summary['skipped_samples']}")
    if summary.get("nonfinite_steps_skipped"):
        lines.append(f"non-finite steps  : {summary['nonfinite_steps_skipped']} skipped")
    if summary.get("duplicate_samples"):
        lines.append(
            f"repeated samples  : {summary['duplicate_samples']} (drawn twice into one batch)"
        )
    lines += eval_lines(ev)
    text = "\n".join(lines)
    print(text, flush=True)
    return text


def eval_lines(ev: dict) -> list[str]:
    """Summary lines for whatever ``eval.tasks`` produced (retrieval, zero-shot, both, none)."""
    lines = []
    for title, keys in (
        ("image->text R@1/5", ("i2t_R@1", "i2t_R@5")),
        ("text->image R@1/5", ("t2i_R@1", "t2i_R@5")),
        ("zero-shot top-1/5", ("zeroshot/top1", "zeroshot/top5")),
        ("kNN top-1        ", ("knn/top1",)),
        ("linear probe top-1", ("linear-probe/top1",)),
    ):
        if keys[0] in ev:
            lines.append(f"{title} : " + " / ".join(f"{ev[k]:.3f}" for k in keys if k in ev))
    if "label_i2t_R@1" in ev and "label_t2i_R@1" in ev:
        lines.append(
            f"same-concept R@1  : i2t {ev['label_i2t_R@1']:.3f}, t2i {ev['label_t2i_R@1']:.3f}"
        )
    if "zeroshot/mean_per_class_recall" in ev:
        lines.append(
            f"zero-shot mean per-class recall : {ev['zeroshot/mean_per_class_recall']:.3f}"
        )
    return lines


def synthetic_presets() -> list[str]:
    from data_pipelines.synthetic import PRESETS

    return list(PRESETS)


# --- parser ----------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="clipfnd", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    sub = p.add_subparsers(dest="command", required=True)

    data = sub.add_parser("data", help="write WebDataset shards")
    dsub = data.add_subparsers(dest="data_command", required=True)
    syn = dsub.add_parser("synthetic", help="the built-in captioned-shapes data (train + val)")
    syn.add_argument("--out", required=True)
    syn.add_argument("--num-samples", type=int, required=True, help="training samples")
    syn.add_argument("--num-val", type=int, default=1000, help="held-out samples (0: none)")
    syn.add_argument("--seed", type=int, default=0)
    syn.add_argument("--shard-size", type=int, default=1000)
    syn.add_argument(
        "--num-concepts", type=int, default=None, help="distinct concepts (default 64; preset's)"
    )
    syn.add_argument("--image-size", type=int, default=None, help="default 64; preset's")
    syn.add_argument(
        "--preset",
        choices=sorted(synthetic_presets()),
        default=None,
        help="fn-testbed: 16 colour-shape concepts whose captions also state each image's "
        "position and size (data where removing false negatives pays; docs/results.md); "
        "fn-paraphrase: the same images, captions that state only the concept, in one of "
        "eight wordings (false negatives that are paraphrases); fn-longtail: the fn-testbed "
        "with concepts as unequally common as web data's (30 %% of the data down to 1.8 %%)",
    )
    syn.set_defaults(func=cmd_data_synthetic)

    dig = dsub.add_parser("digits", help="scikit-learn's handwritten digits (train + val)")
    dig.add_argument("--out", required=True)
    dig.add_argument("--seed", type=int, default=0)
    dig.add_argument("--shard-size", type=int, default=400)
    dig.add_argument("--image-size", type=int, default=32)
    dig.set_defaults(func=cmd_data_digits)

    b = dsub.add_parser(
        "build", help="shards from your own data (CSV/TSV, image folder, HF dataset)"
    )
    b.add_argument("--from", dest="source", required=True, choices=["csv", "imagefolder", "hf"])
    b.add_argument(
        "--input", required=True, help="CSV/TSV file, image folder, or HF dataset folder/parquet"
    )
    b.add_argument("--out", required=True)
    b.add_argument("--shard-size", type=int, default=1000)
    b.add_argument("--image-column", default="image", help="csv/hf: column with the image (path)")
    b.add_argument("--caption-column", default="caption", help="csv/hf: column with the caption")
    b.add_argument("--label-column", default=None, help="optional integer or string label column")
    b.add_argument(
        "--separator", default=None, help="csv: field separator (default: from the extension)"
    )
    b.add_argument("--hf-split", default="train", help="hf: split to read from a DatasetDict")
    b.add_argument(
        "--images-only",
        action="store_true",
        help="vision-only data (mode: simclr): no captions needed or read; with imagefolder, "
        "add --label-column folder to label images by their class subfolder",
    )
    b.set_defaults(func=cmd_data_build)

    ix = dsub.add_parser(
        "index",
        help="a manifest for existing WebDataset shards (img2dataset's output), read in place",
        description="Index WebDataset shards where they are: reads tar headers and the small "
        ".txt/.json members (no image is decoded) and writes a manifest that data.train, "
        "data.val and clipfnd eval --data accept. A sample's dataset index is its shard's "
        "offset plus its position among the shard's usable samples (an image, a caption unless "
        "--images-only, and img2dataset's status 'success' when present).",
    )
    ix.add_argument(
        "sources",
        nargs="+",
        metavar="SOURCE",
        help="shard folders, files or brace patterns (cc3m/{00000..00331}.tar); several "
        "sources as more arguments or joined by ::",
    )
    ix.add_argument(
        "--out", required=True, help="the manifest file (or a folder for manifest.json)"
    )
    ix.add_argument("--label-field", default=None, help="a .json field holding each sample's label")
    ix.add_argument("--images-only", action="store_true", help="a sample needs no caption")
    ix.add_argument(
        "--upsampling-factors",
        default=None,
        help="one factor per source joined by :: (e.g. 1::2); shards are drawn by weight under "
        "data.resampled=true",
    )
    ix.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    ix.add_argument(
        "--absolute-paths",
        action="store_true",
        help="store absolute shard paths (default: relative to the manifest when inside its folder)",
    )
    ix.add_argument(
        "--skip-unreadable",
        action="store_true",
        help="leave shards that cannot be read out of the manifest instead of stopping",
    )
    ix.add_argument("--no-progress", action="store_true")
    ix.set_defaults(func=cmd_data_index)

    v = dsub.add_parser(
        "verify", help="check a split's shards against its manifest (counts, indices, labels)"
    )
    v.add_argument(
        "dir", help="a shard folder with manifest.json, or a manifest of clipfnd data index"
    )
    v.set_defaults(func=cmd_data_verify)

    t = sub.add_parser(
        "train",
        help="train from a YAML config with key=value overrides",
        description="Train from a YAML config, with dotted key=value overrides. Launch with "
        "`accelerate launch [flags] -m clipfnd train ...` for several processes.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        add_help=False,
    )
    t.add_argument("-h", "--help", action=ConfigKeysHelp, help="this help, with every config key")
    t.add_argument("config")
    t.add_argument("overrides", nargs="*", help="dotted overrides, e.g. optim.lr=1e-3")
    t.set_defaults(func=cmd_train)

    from .eval_export import add_parsers  # clipfnd eval / clipfnd export

    add_parsers(sub)
    from .report import add_parser as add_report  # clipfnd report

    add_report(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    _setup_logging()
    args = build_parser().parse_args(argv)
    from data_pipelines import DataError
    from data_pipelines.urls import redact

    from ..errors import NonFiniteError, UserError

    def error(e: BaseException) -> None:
        print(f"clipfnd: error: {redact(str(e))}", file=sys.stderr, flush=True)

    try:
        return args.func(args)
    except NonFiniteError as e:
        error(e)
        return 3
    except PeerStopped as e:
        error(e)
        return 1
    except Stopped as e:
        error(e)
        return 128 + signal.SIGTERM
    except Interrupted as e:
        if int(os.environ.get("RANK", "0")) == 0:
            error(e)
        return 128 + signal.SIGINT
    except KeyboardInterrupt:  # Ctrl-C in any other command
        print("clipfnd: interrupted", file=sys.stderr, flush=True)
        return 128 + signal.SIGINT
    except (UserError, DataError, FileNotFoundError) as e:
        # one readable line for what the user can fix; anything else is a bug and keeps its
        # traceback
        error(e)
        return 2


if __name__ == "__main__":
    sys.exit(main())
