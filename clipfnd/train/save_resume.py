"""Writing checkpoints under ``RUN/checkpoints/step_NNNNNNNN`` (atomically, described fully),
and resuming from them. The layout and reading are ``clipfnd.checkpoints``.

A checkpoint is Accelerate's ``save_state`` (model as safetensors; optimiser, scaler and RNG
states of every process, which Accelerate loads with ``torch.load(weights_only=True)``) plus
what clipfnd writes and reads itself, never as a pickle:

- ``tables.safetensors``: the per-sample tables (``StateTables``);
- ``scheduler.json``: the learning-rate scheduler's state;
- ``trainer_state.json``: step, epoch, world size, the full run config;
- ``loader_rank{r}.json``: where each rank's data stream stands inside the epoch.

``save`` writes one (every process calls it); ``resume`` loads the one ``resume=`` names,
after checking that the run's config agrees with it on ``RESUME_KEYS``.

Everything is written into ``step_N.tmp`` and renamed to ``step_N`` when complete, so
``resume=latest`` never sees a half-written checkpoint; ``trainer_state.json`` is written
last and its presence marks a complete checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import safetensors
import torch

from data_pipelines.loader import LoaderState

from .. import distributed
from ..checkpoints import (
    CHECKSUMS,
    TRAINER_STATE,
    checkpoint_dir,
    file_checksums,
    final_path,
    find_latest,
    is_valid,
    list_checkpoints,
    read_trainer_state,
    tmp_path,
    verify_checksums,
)
from ..config import Config, ConfigError, from_dict, to_dict
from ..errors import CheckpointError, UserError
from ..state import (
    TABLES_FILE,
    ShardedTables,
    StateTables,
    load_detector_state,
    load_tables,
    save_detector_state,
    save_tables,
    shard_file,
)
from . import sharded
from .schedule import optimizer_steps_in_epoch

if TYPE_CHECKING:
    from accelerate import Accelerator

    from data_pipelines.loader import ShardStream

    from ..fnd import Detector

log = logging.getLogger(__name__)


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".part")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True))
    os.replace(tmp, path)


def publish(
    run_dir: str | os.PathLike, step: int, trainer_state: dict[str, Any], keep: int
) -> Path:
    """(Main process.) Mark ``step_N.tmp`` complete, rename it to ``step_N``, prune old ones."""
    tmp = tmp_path(run_dir, step)
    trainer_state = {**trainer_state, CHECKSUMS: file_checksums(tmp)}
    write_json(tmp / TRAINER_STATE, trainer_state)
    final = final_path(run_dir, step)
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    for old in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    for stale in checkpoint_dir(run_dir).glob("step_*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)
    return final


# Keys a resumed run must share with the checkpoint: they decide what the weights, the
# per-sample tables and the data position mean.
RESUME_KEYS = (
    "mode",
    "model.name",
    "data.train",
    "data.batch_size",
    "data.num_workers",
    "data.chunk_size",
    "data.shuffle_buffer",
    "data.resampled",
    "seed",
    "loss.name",
    "fnd.detector",
    "model.lock_image",
    "model.lock_image_unlocked_groups",
    "model.lock_text",
    "model.lock_text_unlocked_layers",
)


def config_differences(saved: dict[str, Any], cfg: Config) -> list[str]:
    now = to_dict(cfg)
    try:  # keys added to the schema after the checkpoint was written take their defaults
        saved = to_dict(from_dict(saved))
    except UserError:
        pass
    out = []
    for key in RESUME_KEYS:
        a, b = saved, now
        for part in key.split("."):
            a, b = (
                a.get(part) if isinstance(a, dict) else None,
                b.get(part) if isinstance(b, dict) else None,
            )
        if a != b:
            out.append(f"{key}: checkpoint {a!r}, now {b!r}")
    return out


@dataclass
class Resumed:
    """Where a resumed run stands: the step and epoch to continue from, this rank's loader
    state (None: the epoch starts fresh), and the run's counters as the checkpoint kept
    them (``COUNTERS``; zero for a fresh run or an older checkpoint)."""

    step: int = 0
    epoch: int = 0
    loader: LoaderState | None = None
    counters: dict[str, float] = field(default_factory=dict)
    path: Path | None = None


# What a run counts from its start and a resume continues (trainer_state.json "counters"):
# bad samples of finished epochs (all ranks), samples repeated in a batch, non-finite steps
# skipped, and the seconds spent training.
COUNTERS = ("skipped_samples", "duplicate_samples", "nonfinite_steps_skipped", "elapsed_seconds")


def _one_line(e: BaseException) -> str:
    if isinstance(e, pickle.UnpicklingError):
        return (
            "a file holds objects beyond plain tensors, which clipfnd will not unpickle (it "
            "could run code)"
        )
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]


def _on_every_rank(work, expected: tuple[type[Exception], ...] = (Exception,)):
    """Run ``work()`` on every rank and agree on the outcome: ``(result, failures, config)``,
    with every rank's failure message (rank-prefixed with several processes) and whether one
    of them is a ``ConfigError`` (a resume that cannot go on with this config). An exception
    that is not ``expected`` is a bug: its traceback is logged on the rank where it happened."""
    result, error, config = None, None, False
    try:
        result = work()
    except Exception as e:
        if isinstance(e, expected):
            error = _one_line(e)
        else:
            log.exception("unexpected error")
            error = f"{type(e).__name__}: {_one_line(e)}"
        config = isinstance(e, ConfigError)
    failures = distributed.failures(error)
    config = not distributed.all_true(not config)
    return result, failures, config


def _candidates(cfg: Config, run_dir: Path) -> list[Path]:
    """The checkpoints ``resume=`` may load, best first; rank 0's view, on every rank."""
    if cfg.resume != "latest":
        return [Path(cfg.resume)]
    found = None
    if distributed.rank() == 0:
        found = []
        for p in reversed(list_checkpoints(run_dir)):
            if is_valid(p):
                found.append(str(p))
            else:
                log.warning("resume=latest: %s is incomplete or corrupt; skipping it", p)
    return [Path(p) for p in distributed.broadcast_object(found)]


@dataclass
class Stateful:
    """What a checkpoint saves beside the RNG states, and a resume loads: the model and the
    optimiser (through Accelerate), the schedule, the per-sample tables and the detector's
    run-wide state."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    tables: StateTables
    detector: Detector


def _check(path: Path, cfg: Config, accelerator: Accelerator) -> tuple[dict[str, Any], LoaderState]:
    """Everything about checkpoint ``path`` that this rank can check without changing any
    state: it is complete, of this run's config, its files match their checksums (this rank's
    share of them), this rank's RNG states load as plain tensors and its loader state reads."""
    rank, world = accelerator.process_index, accelerator.num_processes
    if not is_valid(path):
        raise CheckpointError(f"{path} is not a complete checkpoint")
    state = read_trainer_state(path)
    diffs = config_differences(state.get("config", {}), cfg)
    if diffs:
        raise ConfigError(
            f"resume: {path} belongs to a run with another config ({'; '.join(diffs)}); "
            "resume with the same settings, or start over with overwrite=true"
        )
    verify_checksums(path, state, share=(rank, world))
    check_no_pickled_state(path, rank)
    loader_file = path / f"loader_rank{rank}.json"
    try:
        loader = LoaderState.from_dict(json.loads(loader_file.read_text()))
    except (OSError, ValueError) as e:  # JSONDecodeError and UnicodeDecodeError among them
        raise CheckpointError(f"{loader_file} is not a loader state: {_one_line(e)}") from e
    return state, loader


def _load(path: Path, accelerator: Accelerator, parts: Stateful) -> None:
    """Load checkpoint ``path`` into the run (weights, optimiser, RNG, tables, schedule, the
    detector's run-wide state)."""
    if sharded.written_sharded(path):  # by a run under FSDP: into FSDP or DDP
        sharded.load(accelerator, parts.model, parts.optimizer, path)
    elif sharded.is_sharded(accelerator):  # by a run under DDP, into FSDP
        sharded.load_unsharded(accelerator, parts.model, parts.optimizer, path)
    else:
        accelerator.load_state(str(path))
    load_tables(parts.tables, path)
    parts.scheduler.load_state_dict(json.loads((path / SCHEDULER_FILE).read_text()))
    load_detector_state(parts.detector, path, read_trainer_state(path).get("step", 0))


def resume(
    cfg: Config,
    accelerator: Accelerator,
    run_dir: Path,
    parts: Stateful,
    stream: ShardStream,
    fresh_hyperparameters: list[dict[str, Any]],
) -> Resumed:
    """Load the checkpoint ``cfg.resume`` names (``latest``: the newest complete one).

    Every rank checks the checkpoint (its share of the checksums, its own RNG and loader
    files), then every rank loads it, and after each part all ranks agree: one checkpoint
    for all, or none. A checkpoint that fails on any rank is skipped by every rank in favour
    of the one before it (``latest``, with a warning naming the rank and the file), or
    refused on every rank (a named checkpoint, or the last candidate).
    """
    if cfg.resume is None:
        return Resumed()
    candidates = _candidates(cfg, run_dir)
    if not candidates:
        log.info("resume=latest: no checkpoint in %s, starting from scratch", run_dir)
        return Resumed()
    for i, path in enumerate(candidates):
        checked, failures, config = _on_every_rank(lambda p=path: _check(p, cfg, accelerator))
        if not failures:
            _, failures, config = _on_every_rank(lambda p=path: _load(p, accelerator, parts))
        if not failures:
            break
        why = "; ".join(failures)
        if config:  # the same on every process: say it once, without the rank
            first = failures[0]
            raise ConfigError(first.split(": ", 1)[1] if distributed.is_distributed() else first)
        if i + 1 == len(candidates):
            if cfg.resume != "latest" and why.endswith("is not a complete checkpoint"):
                raise CheckpointError(f"resume={cfg.resume!r}: {why}")
            raise CheckpointError(f"cannot load checkpoint {path}: {why}")
        if distributed.rank() == 0:  # every rank knows it (the failures are gathered)
            log.warning(
                "checkpoint %s cannot be loaded (%s); every process falls back to %s",
                path,
                why,
                candidates[i + 1],
            )
    state, loader_state = checked
    if state["world_size"] != accelerator.num_processes:
        k = cfg.optim.accum_steps
        if loader_state.batches < optimizer_steps_in_epoch(stream, loader_state.epoch, k) * k:
            raise CheckpointError(
                f"{path} was written by {state['world_size']} processes in the middle of epoch "
                f"{loader_state.epoch}; resume it with the same number of processes "
                f"(now {accelerator.num_processes})"
            )
        loader_state = None
    log.info("resumed from %s (step %d, epoch %d)", path, state["step"], state["epoch"])
    apply_changed_settings(parts.optimizer, parts.scheduler, fresh_hyperparameters)
    epoch = state["epoch"] if loader_state is not None else state["epoch"] + 1
    saved = state.get("counters") if isinstance(state.get("counters"), dict) else {}
    counters = {
        k: saved[k]
        for k in COUNTERS
        if isinstance(saved.get(k), (int, float)) and not isinstance(saved.get(k), bool)
    }
    return Resumed(int(state["step"]), int(epoch), loader_state, counters, path)


def apply_changed_settings(
    optimizer: torch.optim.Optimizer, scheduler: Any, fresh: list[dict[str, Any]]
) -> None:
    """Settings of the optimiser that a checkpoint carries, changed on resume: the new values
    are used, and each change is said in one line. The optimiser state (loaded) holds every
    parameter group's hyperparameters and the scheduler its base learning rates; without
    this they would silently override ``optim.lr``, ``optim.weight_decay``, ``optim.betas``,
    ``optim.eps``, ``optim.momentum`` and ``loss.tau_lr`` while ``config.yaml`` recorded the
    new values. Every rank runs it (the change is the same everywhere)."""
    groups = optimizer.param_groups  # ``fresh``: each group's, as this run's config built them
    for key in ("weight_decay", "betas", "eps", "momentum"):
        changed = [
            (i, g[key], want[key])
            for i, (g, want) in enumerate(zip(groups, fresh))
            if key in g and key in want and _differs(g[key], want[key])
        ]
        for i, _, want in changed:
            groups[i][key] = want
        if changed:
            log.info(
                "resume: optimizer %s changes from %s (checkpoint) to %s (this run's config)",
                key,
                " / ".join(str(old) for _, old, _ in changed),
                " / ".join(str(new) for _, _, new in changed),
            )
    base = [w["initial_lr"] for w in fresh]
    if any(_differs(a, b) for a, b in zip(scheduler.base_lrs, base)):
        old = list(scheduler.base_lrs)
        scheduler.base_lrs = base
        step = scheduler.last_epoch
        for g, lr, rule in zip(groups, base, scheduler.lr_lambdas):
            g["initial_lr"] = lr
            g["lr"] = lr * rule(step)
        log.info(
            "resume: the base learning rate changes from %s (checkpoint) to %s (optim.lr, and "
            "loss.tau_lr for a learned temperature); the schedule continues from step %d with it",
            _fmt(old),
            _fmt(base),
            step,
        )


def _differs(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) != len(b) or any(_differs(x, y) for x, y in zip(a, b))
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return abs(float(a) - float(b)) > 1e-12 * max(abs(float(a)), abs(float(b)), 1e-300)
    return a != b


def _fmt(values: list[float]) -> str:
    return "/".join(f"{v:g}" for v in values)


class CheckpointWriteError(CheckpointError):
    """A checkpoint could not be written (disk full, read-only folder)."""


# what a write that fails for want of space or permission raises (torch.save: RuntimeError)
WRITE_ERRORS = (OSError, RuntimeError, safetensors.SafetensorError)


SCHEDULER_FILE = "scheduler.json"


def check_no_pickled_state(path: Path, process_index: int) -> None:
    """Refuse a checkpoint that holds objects only a full unpickling could load (clipfnd never
    writes ``custom_checkpoint_*.pkl``; loading one would run whatever code it holds), and one
    whose RNG states do not load with ``weights_only=True`` (Accelerate would skip them
    silently, and the resume would not be exact)."""
    from accelerate.utils import load as restricted_load  # weights_only=True, numpy allowed

    pickled = sorted(p.name for p in path.glob("custom_checkpoint_*.pkl"))
    if pickled:
        raise CheckpointError(
            f"{path} holds {', '.join(pickled)}, which clipfnd does not write and will not "
            "unpickle (it could run arbitrary code); was it written by an older clipfnd or "
            "changed by someone else?"
        )
    rng = path / f"random_states_{process_index}.pkl"
    try:
        restricted_load(rng)
    except Exception as e:
        raise CheckpointError(
            f"{rng} does not load as plain RNG states ({type(e).__name__}); refusing it"
        ) from e


def all_finite(parts: Stateful, device: torch.device) -> bool:
    """Whether the weights and the optimiser state are finite on every process."""
    tensors = [p.detach() for p in parts.model.parameters()]
    for state in parts.optimizer.state.values():
        tensors += [v for v in state.values() if torch.is_tensor(v) and v.is_floating_point()]
    # under FSDP each process checks the shard it holds
    local = [t.to_local() if hasattr(t, "to_local") else t for t in tensors]
    finite = all(bool(torch.isfinite(t).all()) for t in local)
    return distributed.all_true(finite, device)


def _write_failed(run_dir: Path, step: int, tmp: Path, failures: list[str]) -> str:
    latest = find_latest(run_dir)
    then = (
        f"The newest complete checkpoint is {latest}; free space, then resume with resume=latest"
        if latest is not None
        else "No checkpoint of this run was written yet; free space, then start again"
    )
    return (
        f"cannot write the checkpoint of step {step} to {tmp} ({'; '.join(failures)}); is the "
        f"disk full or the folder read-only? {then}"
    )


def save(
    cfg: Config,
    accelerator: Accelerator,
    run_dir: Path,
    parts: Stateful,
    step: int,
    epoch: int,
    loader_state: LoaderState,
    counters: dict[str, float] | None = None,
) -> Path | None:
    """Write and publish a checkpoint of step ``step`` (every process calls it); None (with a
    warning) when the weights or the optimiser state hold non-finite values: such a
    checkpoint is never published. ``counters``: the run's ``COUNTERS``, kept in
    ``trainer_state.json`` for a resume to continue them.

    A write that fails on any process (a full disk, a folder where a file goes) stops every
    process with the same one-line ``CheckpointWriteError`` naming the rank and the cause; the
    half-written ``step_N.tmp`` is removed and the newest complete checkpoint stays the newest.
    """
    acc = accelerator
    if not all_finite(parts, acc.device):
        log.warning(
            "step %d: the weights or the optimiser state hold non-finite values; no "
            "checkpoint is written",
            step,
        )
        return None
    tmp = tmp_path(run_dir, step)

    def write() -> None:
        if acc.is_main_process:
            if tmp.exists():  # a save of this step that crashed
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)

    def write_parts() -> None:
        if sharded.is_sharded(acc):
            sharded.save(acc, parts.model, parts.optimizer, tmp)
        else:
            acc.save_state(str(tmp), safe_serialization=True)
        if isinstance(parts.tables, ShardedTables):  # every rank its own rows
            save_tables(parts.tables, tmp / shard_file(parts.tables.rank, parts.tables.world))
        elif acc.is_main_process:  # replicated: one copy
            save_tables(parts.tables, tmp / TABLES_FILE)
        if acc.is_main_process:
            write_json(tmp / SCHEDULER_FILE, parts.scheduler.state_dict())
            save_detector_state(parts.detector, tmp)
        write_json(tmp / f"loader_rank{acc.process_index}.json", loader_state.to_dict())

    def publish_it() -> None:
        if acc.is_main_process:
            publish(
                run_dir,
                step,
                {
                    "step": step,
                    "epoch": epoch,
                    "world_size": acc.num_processes,
                    "model_name": cfg.model.name,
                    "config": to_dict(cfg),
                    "counters": dict(counters or {}),
                },
                cfg.train.keep_checkpoints,
            )

    for part in (write, write_parts, publish_it):  # each agreed on by every rank
        _, failures, _ = _on_every_rank(part, WRITE_ERRORS)
        if failures:
            if acc.is_main_process:
                shutil.rmtree(tmp, ignore_errors=True)  # give back the space it took
            raise CheckpointWriteError(_write_failed(run_dir, step, tmp, failures))
    return final_path(run_dir, step)
