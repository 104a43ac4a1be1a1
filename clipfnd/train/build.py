"""Building a run: everything ``train()`` needs, checked before the run folder is claimed.

``build_run(cfg)`` makes the accelerator, the model (open_clip's, or a vision-only encoder),
the per-sample tables, the objective (its method and detector), the data stream, the
optimiser and its schedule, claims the run folder and writes ``config.yaml``. Whatever can
fail on the user's input (model name, data, batch size, detector needs) is checked before the
folder is created, so a run that cannot start leaves nothing behind.

``Run`` holds what was built. The step (``step.py``), the checkpoints (``save_resume.py``) and
the metrics (``metrics.py``) take the pieces they need as arguments and never see a ``Run``.
"""

from __future__ import annotations

import copy
import logging
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedType, set_seed

from clipfnd_eval.layouts import open_dataset
from clipfnd_eval.zeroshot import load_classnames
from data_pipelines import DataError, ShardSet, load_shard_set
from data_pipelines.loader import ShardStream
from data_pipelines.pixels import REDUCING_GAP, fast_transform, with_clean_view

from .. import distributed
from ..checkpoints import checkpoint_dir, list_checkpoints
from ..config import (
    Config,
    ConfigError,
    detection_view,
    eval_tasks,
    report_to,
    to_dict,
    to_yaml,
)
from ..errors import UserError
from ..methods import TemperaturePolicy
from ..models import check_model_name, create_clip, lock_towers, set_grad_checkpointing
from ..models.factory import SCHEMAS
from ..models.vision import vision_from_config
from ..registry import check_choices
from ..state import ShardedTables, StateTables
from .lock import RunLock, RunLocked
from .objective import OBJECTIVES, Objective
from .save_resume import Stateful
from .schedule import build_scheduler, optimizer_steps_in_epoch
from .sharded import is_sharded
from .step import StepResult, optimizer_step

log = logging.getLogger("clipfnd.train")


@dataclass
class Run:
    """What ``build_run`` made for one run."""

    cfg: Config
    accelerator: Accelerator
    run_dir: Path
    model: torch.nn.Module
    bundle: Any  # the model's bundle: transforms and tokenizer (``clipfnd.models``)
    stream: ShardStream
    tables: StateTables
    objective: Objective
    optimizer: torch.optim.Optimizer
    scheduler: Any
    total_steps: int
    temperature: TemperaturePolicy
    tau_group: int | None = None  # the temperature's own parameter group, if it has one
    lock: RunLock | None = None  # the run folder's lock (main process)
    # every parameter group's hyperparameters as this run's config built them (a resume
    # applies those that changed: ``save_resume.apply_changed_settings``)
    fresh_hyperparameters: list[dict[str, Any]] = field(default_factory=list)

    def stateful(self) -> Stateful:
        """What a checkpoint saves and a resume loads."""
        return Stateful(
            self.model, self.optimizer, self.scheduler, self.tables, self.objective.detector
        )

    def optimizer_step(self, batches, epoch: int, logged: bool) -> StepResult:
        """One optimiser step of this run (``step.optimizer_step``) over ``batches``."""
        o = self.cfg.optim
        return optimizer_step(
            batches,
            accelerator=self.accelerator,
            model=self.model,
            optimizer=self.optimizer,
            scheduler=self.scheduler,
            objective=self.objective,
            accum_steps=o.accum_steps,
            cached=o.accum_mode == "cached",
            grad_clip=o.grad_clip,
            temperature=self.temperature,
            tau_group=self.tau_group,
            epoch=epoch,
            logged=logged,
        )


def param_groups(
    model: torch.nn.Module, weight_decay: float, temperature: TemperaturePolicy
) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices only (not norms, biases, logit_scale); a method
    that learns its temperature apart (``temperature.group_lr``) gets a last group for it."""
    decay, no_decay, own = [], [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if name.endswith("logit_scale"):
            (own if temperature.group_lr is not None else no_decay).append(p)
        elif p.ndim < 2 or "bn" in name or "ln" in name or "bias" in name:
            no_decay.append(p)
        else:
            decay.append(p)
    groups = [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    if own:
        groups.append({"params": own, "weight_decay": 0.0, "lr": temperature.group_lr})
    return groups


def build_optimizer(groups: list[dict[str, Any]], cfg: Config) -> torch.optim.Optimizer:
    """``optim.name``: AdamW (CLIP's), SGD with momentum, or LARS (SimCLR's, from timm: torch
    has none). Weight decay is per group (``param_groups``); LARS adapts the step of every
    parameter with weight decay, as SimCLR excludes norms and biases from both."""
    o = cfg.optim
    if o.name == "adamw":
        return torch.optim.AdamW(groups, lr=o.lr, betas=tuple(o.betas), eps=o.eps)
    if o.name == "sgd":
        return torch.optim.SGD(groups, lr=o.lr, momentum=o.momentum, nesterov=False)
    from timm.optim import Lars

    # timm's defaults: no trust clipping, no adaptation where weight_decay == 0 (norms, biases)
    return Lars(groups, lr=o.lr, momentum=o.momentum)


def _check_run_dir(cfg: Config, run_dir: Path, accelerator: Accelerator) -> None:
    existing = list_checkpoints(run_dir) if run_dir.is_dir() else []
    if not existing or cfg.resume is not None:
        return
    if not cfg.overwrite:
        raise ConfigError(
            f"output_dir={str(run_dir)!r} already holds checkpoints of a run "
            f"({existing[-1].name}); pass resume=latest to continue it, overwrite=true to start "
            "over there, or choose another output_dir"
        )
    if accelerator.is_main_process:
        shutil.rmtree(checkpoint_dir(run_dir))
    accelerator.wait_for_everyone()


def main_process_first(accelerator: Accelerator, build, what: str, user_input: bool = True):
    """``build()`` on process 0 first (a pretrained download lands in the cache once), then on
    the others. A failure on any process is raised on every process as one ``UserError``
    naming the process and the cause, so that none waits alone in a collective (Accelerate's
    ``main_process_first`` would leave the others waiting at its barrier for a process 0 that
    raised). ``what`` names the thing built; ``user_input``: whatever fails in it comes from
    the user's files (a model config of theirs), else the traceback of an error that is not a
    ``UserError`` is logged too (a bug)."""
    out, error = None, None
    if accelerator.is_main_process:
        out, error = _attempt(build, what, user_input)
    error = distributed.broadcast_object(error)
    if error is not None:
        raise UserError(f"rank 0: {error}" if accelerator.num_processes > 1 else error)
    if not accelerator.is_main_process:
        out, error = _attempt(build, what, user_input)
    failures = distributed.failures(error)
    if failures:
        raise UserError("; ".join(failures))
    return out


def _attempt(build, what: str, user_input: bool) -> tuple[Any, str | None]:
    try:
        return build(), None
    except UserError as e:
        return None, str(e)
    except Exception as e:
        if not user_input:
            log.exception("building %s failed", what)
        first = (str(e).strip().splitlines() or [""])[0][:300]
        return None, f"cannot build {what}: {type(e).__name__}: {first}"


def trackers(cfg: Config) -> list:
    """Accelerate's trackers for ``train.report_to``: TensorBoard logs in ``RUN/tensorboard``;
    a wandb run named after the run folder, its files in ``RUN/wandb`` (project
    ``$WANDB_PROJECT``, default clipfnd; ``WANDB_MODE=offline`` needs no network)."""
    from accelerate.tracking import TensorBoardTracker, WandBTracker

    run_dir = Path(cfg.output_dir)
    out: list = []
    for name in report_to(cfg):
        if name == "tensorboard":
            out.append(TensorBoardTracker("tensorboard", run_dir))
        elif name == "wandb":
            out.append(
                WandBTracker(
                    os.environ.get("WANDB_PROJECT", "clipfnd"),
                    dir=str(run_dir),
                    name=run_dir.resolve().name,
                    config=to_dict(cfg),
                )
            )
    return out


def check_eval_data(cfg: Config) -> None:
    """``data.val`` opens as an evaluation dataset (the layout is recognised, a manifest's
    shards exist) and has what ``eval.tasks`` needs (class names for zero-shot, from the data
    or ``eval.classnames``): checked at start-up rather than found missing after training."""
    if not cfg.data.val:
        if cfg.eval.classnames:
            raise ConfigError("eval.classnames is set but data.val is not: nothing to classify")
        return
    try:
        ds = open_dataset(cfg.data.val)
        if cfg.eval.classnames:
            load_classnames(cfg.eval.classnames)
    except (FileNotFoundError, DataError, UserError) as e:
        key = f"data.val={cfg.data.val!r}" if not cfg.eval.classnames else "eval.classnames"
        raise ConfigError(f"{key}: {e}") from e
    evaluates = cfg.eval.at_end or cfg.eval.every_steps or cfg.eval.every_epochs
    if evaluates and "zeroshot" in eval_tasks(cfg) and not (cfg.eval.classnames or ds.classnames):
        raise ConfigError(
            f"eval.tasks={eval_tasks(cfg)}: zero-shot classification needs class names and "
            f"data.val={cfg.data.val!r} has none: set eval.classnames=FILE (one name a line) or "
            "eval.classnames=imagenet, or leave zeroshot out of eval.tasks"
        )


def check_detector_batch(cfg: Config, detector) -> None:
    """The detector against the global batch's similarity rows and their negatives (e.g.
    ``fnd.alpha``: ``GloFND.check_batch``); simclr has two views, so two rows, per image."""
    views = 2 if cfg.mode == "simclr" else 1
    rows = cfg.data.batch_size * views
    try:
        detector.check_batch(rows, rows - views)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def build_run(cfg: Config) -> Run:
    """Build everything a run needs (see the module's docstring)."""
    check_choices(cfg)
    accelerator = _accelerator(cfg)
    set_seed(cfg.seed)
    shard_set = load_shard_set(cfg.data.train)
    check_eval_data(cfg)
    bundle = _model(cfg, accelerator)
    model = bundle.model
    tables = _tables(cfg, shard_set, accelerator)
    # uint8 images from the workers, normalised on the device (data_pipelines/pixels.py)
    gap = REDUCING_GAP if cfg.data.reduced_jpeg_decoding else None
    if detection_view(cfg) == "clean":  # GloFND reads un-augmented images (fnd.view)
        transform = with_clean_view(bundle.preprocess_train, bundle.preprocess_val)
    else:
        transform = fast_transform(bundle.preprocess_train, reducing_gap=gap)
    objective = OBJECTIVES[cfg.mode](
        cfg,
        tables,
        has_labels=shard_set.num_labels > 0,
        normalize=getattr(transform, "normalize", None),
    )
    check_detector_batch(cfg, objective.detector)
    temperature = objective.method.temperature_policy()
    temperature.apply(model)
    if is_sharded(accelerator):
        _prepare_for_fsdp(model, accelerator)
    stream = _stream(cfg, shard_set, transform, bundle.tokenizer, accelerator)
    groups = param_groups(model, cfg.optim.weight_decay, temperature)
    optimizer = build_optimizer(groups, cfg)
    k = cfg.optim.accum_steps
    steps_all = sum(optimizer_steps_in_epoch(stream, e, k) for e in range(cfg.train.epochs))
    total_steps = min(steps_all, cfg.train.max_steps or steps_all)
    if total_steps < 1:
        raise ConfigError(
            f"the run has no optimiser step: {steps_all} steps in {cfg.train.epochs} epoch(s) "
            f"with data.batch_size={cfg.data.batch_size} and optim.accum_steps={k}"
        )
    objective.detector.plan(total_steps, optimizer_steps_in_epoch(stream, 0, k))
    tau_group = len(groups) - 1 if temperature.group_lr is not None else None
    scheduler = build_scheduler(
        optimizer,
        kind=cfg.optim.schedule,
        warmup=cfg.optim.warmup_steps,
        total=total_steps,
        tau_group=tau_group,
        tau_schedule=temperature.lr_rule,
    )
    fresh = [
        {k: copy.deepcopy(v) for k, v in g.items() if k != "params"} for g in optimizer.param_groups
    ]

    # Everything the user could have got wrong has been checked: now the run folder.
    run_dir, lock = _claim_run_dir(cfg, accelerator)
    model, optimizer = accelerator.prepare(model, optimizer)
    # The scheduler is stepped by hand once per optimiser step (Accelerate would step it once
    # per process); it and the tables are checkpointed by clipfnd itself (JSON, safetensors),
    # not registered with Accelerate, which would pickle them.
    if accelerator.is_main_process:
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        _log_plan(cfg, stream, shard_set.num_samples)
    if report_to(cfg):
        accelerator.init_trackers("tensorboard")  # each tracker was named when built
    return Run(
        cfg,
        accelerator,
        run_dir,
        model,
        bundle,
        stream,
        tables,
        objective,
        optimizer,
        scheduler,
        total_steps,
        temperature,
        tau_group,
        lock,
        fresh,
    )


def refuse_unsupported_sharding() -> None:
    """clipfnd trains with DDP or FSDP2; a launch that asks for DeepSpeed (``accelerate launch
    --use_deepspeed``) is refused at once: its sharded optimiser was never checked against
    clipfnd's checkpoints, temperature and tables."""
    if os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() in ("true", "1", "yes"):
        raise ConfigError(
            "`accelerate launch --use_deepspeed` (ACCELERATE_USE_DEEPSPEED=true): clipfnd does "
            "not support DeepSpeed; launch with --multi_gpu (DDP), or shard a model that does "
            "not fit one device with --use_fsdp --fsdp_version 2"
        )


def _accelerator(cfg: Config) -> Accelerator:
    """The accelerator (the CPU where there is no CUDA), its process group checked against
    the launch and the global batch."""
    use_cpu = not torch.cuda.is_available()
    refuse_unsupported_sharding()
    if cfg.train.mixed_precision == "fp16" and use_cpu:
        raise ConfigError("train.mixed_precision=fp16 needs CUDA; use bf16 or no on the CPU")
    if cfg.mode == "clip":
        check_model_name(cfg.model.name)
    elif cfg.model.pretrained is not None:
        raise ConfigError(
            "model.pretrained loads CLIP weights (mode clip); vision-only runs start from random "
            "initialisation"
        )
    accelerator = Accelerator(
        cpu=use_cpu,
        mixed_precision=cfg.train.mixed_precision,
        log_with=trackers(cfg) or None,
        project_dir=cfg.output_dir,
    )
    _fsdp_on_cpu(accelerator)
    fsdp = accelerator.state.fsdp_plugin if is_sharded(accelerator) else None
    if fsdp is not None and fsdp.fsdp_version != 2:
        raise ConfigError(
            f"FSDP version {fsdp.fsdp_version}: clipfnd trains with FSDP2 (fully_shard); launch "
            "with --use_fsdp --fsdp_version 2"
        )
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    if launched > 1 and accelerator.num_processes != launched:
        raise RuntimeError(
            f"launched as {launched} processes but Accelerate formed a group of "
            f"{accelerator.num_processes}: on a machine without GPUs use "
            "`accelerate launch --multi_gpu --num_processes N ...` (clipfnd then runs them on the CPU)"
        )
    world = accelerator.num_processes
    if cfg.data.batch_size % world:
        raise ConfigError(
            f"data.batch_size={cfg.data.batch_size} (the global batch, all processes together; "
            f"open_clip's --batch-size is per GPU) does not divide by {world} processes"
        )
    return accelerator


def _fsdp_on_cpu(accelerator: Accelerator) -> None:
    """Accelerate runs its FSDP plugin only on GPU-like devices: on the CPU (gloo) it would
    quietly run DDP. There, clipfnd turns Accelerate's FSDP2 path on itself."""
    from accelerate.state import PartialState
    from accelerate.utils import FullyShardedDataParallelPlugin

    asked = os.environ.get("ACCELERATE_USE_FSDP", "false").lower() == "true"
    if not asked or accelerator.distributed_type != DistributedType.MULTI_CPU:
        return
    plugin = FullyShardedDataParallelPlugin()  # from the FSDP_* variables of the launch
    # both shared states: Accelerate copies PartialState's over AcceleratorState's whenever an
    # AcceleratorState is made again
    PartialState().distributed_type = DistributedType.FSDP
    accelerator.state.distributed_type = DistributedType.FSDP
    if accelerator.mixed_precision != "no":  # as Accelerate does where it runs FSDP itself
        plugin.set_mixed_precision(accelerator.mixed_precision)
    accelerator.state.fsdp_plugin = plugin


# the blocks each tower repeats: FSDP's units of sharding unless the launch names others
# (--fsdp_transformer_layer_cls_to_wrap)
FSDP_BLOCKS = ("ResidualAttentionBlock", "Bottleneck", "BasicBlock")


def _prepare_for_fsdp(model: torch.nn.Module, accelerator: Accelerator) -> None:
    """Before ``accelerator.prepare`` shards the model: FSDP2 shards every parameter on its
    first dimension and takes no 0-d one, so each 0-d parameter (the temperature,
    ``logit_scale``) becomes a 1-element vector while training (``distributed.temperature``
    reads it; checkpoints keep the 0-d shape). Unless the launch chose a wrapping policy, each tower's repeated blocks
    (open_clip's ``ResidualAttentionBlock``, torchvision's ResNet blocks) are sharded one by
    one, and the rest (embeddings, projections, the temperature) with the root."""
    from torch.distributed.fsdp.wrap import transformer_auto_wrap_policy

    scalars = []  # 0-d parameters: the temperature (and e.g. SigLIP's logit_bias)
    for prefix, module in model.named_modules():
        for name, p in list(module.named_parameters(recurse=False)):
            if p.dim() == 0:
                vector = torch.nn.Parameter(p.detach().reshape(1).clone(), p.requires_grad)
                setattr(module, name, vector)
                scalars.append(f"{prefix}.{name}" if prefix else name)
    model.clipfnd_scalar_parameters = tuple(scalars)  # 0-d again in checkpoints (sharded.py)
    plugin = accelerator.state.fsdp_plugin
    if plugin.auto_wrap_policy is None:
        present = {type(m).__name__ for m in model.modules()}
        blocks = [b for b in FSDP_BLOCKS if b in present]
        if blocks:
            plugin.auto_wrap_policy = transformer_auto_wrap_policy
            plugin.transformer_cls_names_to_wrap = blocks


def _tables(cfg: Config, shard_set: ShardSet, accelerator: Accelerator) -> StateTables:
    """The per-sample tables of the training set: whole on every process, or sharded."""
    device = "cpu" if cfg.fnd.state_on_cpu else accelerator.device
    if cfg.fnd.state == "sharded":
        return ShardedTables(
            shard_set.num_samples,
            device,
            rank=accelerator.process_index,
            world=accelerator.num_processes,
        )
    return StateTables(shard_set.num_samples, device)


def _model(cfg: Config, accelerator: Accelerator):
    """The model's bundle (model, transforms, tokenizer), towers locked, gradient
    checkpointing and compilation as asked."""
    if cfg.mode == "clip":
        bundle = main_process_first(
            accelerator,
            lambda: create_clip(
                cfg.model.name,
                pretrained=cfg.model.pretrained,
                init_logit_scale=cfg.model.init_logit_scale,
            ),
            f"model {cfg.model.name}",
            user_input=cfg.model.name.startswith(SCHEMAS) or cfg.model.pretrained is not None,
        )
    else:
        bundle = vision_from_config(to_dict(cfg))
    model = bundle.model
    if cfg.model.lock_image or cfg.model.lock_text:
        m = cfg.model
        lock_towers(
            model,
            lock_image=m.lock_image,
            image_unlocked_groups=m.lock_image_unlocked_groups,
            image_freeze_bn_stats=m.lock_image_freeze_bn_stats,
            lock_text=m.lock_text,
            text_unlocked_layers=m.lock_text_unlocked_layers,
            text_freeze_layer_norm=m.lock_text_freeze_layer_norm,
        )
    if cfg.train.grad_checkpointing:
        set_grad_checkpointing(model, cfg.model.name)
    if cfg.train.compile:
        model.compile(backend=cfg.train.compile_backend)  # forward only; same state-dict keys
    return bundle


def _stream(
    cfg: Config, shard_set: ShardSet, transform, tokenizer, accelerator: Accelerator
) -> ShardStream:
    return ShardStream(
        shard_set,
        global_batch_size=cfg.data.batch_size,
        rank=accelerator.process_index,
        world=accelerator.num_processes,
        image_transform=transform,
        tokenize=tokenizer,
        num_workers=cfg.data.num_workers,
        seed=cfg.seed,
        shuffle_buffer=cfg.data.shuffle_buffer,
        chunk_size=cfg.data.chunk_size,
        on_error=cfg.data.on_error,
        resampled=cfg.data.resampled,
        samples_per_epoch=cfg.data.samples_per_epoch,
        retries=cfg.data.retries,
    )


def _claim_run_dir(cfg: Config, accelerator: Accelerator) -> tuple[Path, RunLock]:
    """The run folder, created and locked by the main process (refused on every process when
    another live process holds it), its old checkpoints handled as ``overwrite`` says."""
    run_dir = Path(cfg.output_dir)
    lock, refused = RunLock(run_dir), None
    if accelerator.is_main_process:
        run_dir.mkdir(parents=True, exist_ok=True)
        try:
            lock.acquire()  # held until the process ends (or finish() releases it)
        except RunLocked as e:
            refused = str(e)
    refused = distributed.broadcast_object(refused)
    if refused is not None:
        raise RunLocked(refused)
    _check_run_dir(cfg, run_dir, accelerator)
    return run_dir, lock


def _log_plan(cfg: Config, stream: ShardStream, num_samples: int) -> None:
    """(Main process.) What the plan of epoch 0 leaves out, said once at the start."""
    k = cfg.optim.accum_steps
    dropped = stream.dropped_in_epoch(0)
    if dropped:
        log.info(
            "epoch 0 leaves out %d of %d samples (the last partial global batch and "
            "uneven shards across processes)",
            dropped,
            num_samples,
        )
    unused = stream.steps_per_epoch(0) % k
    if unused:
        log.info(
            "optim.accum_steps=%d: the last %d micro-batch(es) of epoch 0 fill no "
            "optimiser step and are not used",
            k,
            unused,
        )
