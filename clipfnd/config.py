"""The one typed schema of a run: defaults <- YAML file <- ``key=value`` overrides.

Every hyperparameter's default lives here and nowhere else. Unknown keys, wrong types and
values out of range are refused when the config is loaded, with a message naming the key.
"""

from __future__ import annotations

import importlib.util
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from .errors import UserError


class ConfigError(UserError):
    """A misconfiguration, refused at start-up; the message names the key."""


@dataclass
class ModelConfig:
    # clip: any open_clip model name, or one of clipfnd's own (default clipfnd-tiny-vit).
    # simclr: the image encoder, tiny (default) | resnet18 | resnet34 | resnet50 (torchvision,
    # random init) | an open_clip model's image tower
    name: str | None = None
    # clip: a local weights file, or an open_clip pretrained tag of model.name (e.g. ViT-B-32 +
    # laion2b_s34b_b79k, through the Hugging Face cache; HF_HUB_OFFLINE=1 once cached).
    # model.name=hf-hub:org/repo or local-dir:DIR loads config and weights from there instead
    pretrained: str | None = None
    init_logit_scale: float | None = None  # default: open_clip's log(1/0.07)
    proj_hidden: int = 2048  # simclr: hidden width of the projection MLP
    proj_dim: int = 128  # simclr: output width of the projection MLP (what the loss compares)
    small_images: bool = False  # simclr, ResNets: 3x3 stride-1 stem, no max-pool (32 px inputs)
    # clip: freeze a tower, as open_clip's --lock-image / --lock-text (LiT): frozen parameters
    # get no gradient and no optimiser state
    lock_image: bool = False
    lock_image_unlocked_groups: int = 0  # the last N layer groups of the image tower stay trained
    lock_image_freeze_bn_stats: bool = False  # also freeze BatchNorm statistics (ResNet towers)
    lock_text: bool = False
    lock_text_unlocked_layers: int = 0  # the last N layers of the text tower stay trained
    lock_text_freeze_layer_norm: bool = True  # keep LayerNorms of the locked text layers frozen


@dataclass
class DataConfig:
    train: str = MISSING  # a shard folder with manifest.json
    val: str | None = None  # held-out shard folder for evaluation
    batch_size: int = 64  # GLOBAL batch (all processes together); must divide by processes
    num_workers: int = 2  # loader processes per training process
    shuffle_buffer: int = 1000  # samples held for shuffling in each worker
    chunk_size: int = 32  # raw samples per worker chunk
    resampled: bool = False  # draw shards with replacement (endless stream)
    samples_per_epoch: int | None = None  # epoch length with resampled (default: dataset size)
    on_error: str = "skip"  # skip | raise: what a bad sample does
    # a remote shard (s3://, gs://, https://, pipe:) is re-read after a transient failure
    # (connection reset, 5xx, timeout) this many times, waiting 0.5 s, 1 s, 2 s, ...; then it
    # counts as bad (on_error=skip) or stops the run (raise)
    retries: int = 3
    # decode a JPEG at 1/2, 1/4 or 1/8 of its size when the training crop still keeps twice
    # the model's side (data_pipelines/pixels.py); only images over twice the side are touched
    reduced_jpeg_decoding: bool = True
    # simclr: the two augmented views (SimCLR's crop, flip, colour jitter, grayscale, blur)
    image_size: int = 32  # side of each view in pixels
    augment_strength: float = 0.5  # colour jitter strength s (SimCLR: 1.0 ImageNet, 0.5 CIFAR)
    crop_min_scale: float = 0.08  # smallest crop area, as a share of the image
    blur: bool = True  # Gaussian blur, p = 0.5 (kernel ~ a tenth of the side)


@dataclass
class OptimConfig:
    name: str = "adamw"  # adamw | sgd | lars (SimCLR's; from timm)
    lr: float = 5e-4
    momentum: float = 0.9  # sgd, lars
    weight_decay: float = 0.1  # not applied to norms, biases, embeddings' scale, logit_scale
    betas: list[float] = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-6
    schedule: str = "cosine"  # cosine | constant (both after linear warmup)
    warmup_steps: int = 50  # linear warmup from optim.lr/warmup_steps (step 1) to optim.lr
    grad_clip: float | None = 1.0  # max global grad norm; null: no clipping
    # micro-batches per optimiser step; every step belongs to one epoch: micro-batches left at
    # an epoch's end that cannot fill a step are not used
    accum_steps: int = 1
    # cached: the micro-batches are one batch (open_clip's --accum-freq: features cached
    # without gradients, then a forward with gradients per micro-batch; the loss, the flags and
    # the estimators see the whole window) | independent: each micro-batch is its own batch
    # (negatives within it; no extra forward)
    accum_mode: str = "cached"


@dataclass
class LossConfig:
    # clip mode: clip (default) | sogclr | fastclip_v3; simclr mode: simclr (default, NT-Xent) |
    # sogclr | dcl | hcl | sscl
    name: str | None = None
    tau: float = 0.07  # sogclr: the constant temperature; fastclip_v3: the initial one
    gamma_min: float = 0.2  # u estimator's moving-average weight after decay
    gamma_decay_epochs: int = 10  # cosine decay of gamma from 1.0 to gamma_min
    rho: float = 6.5  # fastclip_v3 temperature term
    tau_lr: float = 1e-4  # fastclip_v3: learning rate of the temperature
    # fastclip_v3: how tau_lr is scheduled. model: the model's warmup + cosine/constant;
    # fastclip: as FastCLIP's code, constant from step 1, a third of it while tau <= 0.03
    tau_schedule: str = "model"
    tau_min: float = 0.01  # fastclip_v3: lower bound of the learned temperature
    # simclr mode, dcl | hcl | sscl (docs/methods.md, "SSCL"): debiasing prior, hardness
    tau_plus: float = 0.1  # class prior of the debiasing (0: none)
    beta: float = 1.0  # hardness weighting exp(beta s / t) (hcl, sscl; dcl uses 0)
    top_k: int = 64  # sscl: hardest negatives each anchor mixes synthetic ones from
    num_synthetic: int = 128  # sscl: synthetic negatives per anchor


@dataclass
class FNDConfig:
    detector: str = "none"  # none | glofnd | oracle | ifnd (simclr mode)
    alpha: float = 1e-3  # GloFND: share of the dataset above each anchor's threshold
    lr: float = 0.05  # GloFND threshold learning rate
    # how a visit moves its anchor's threshold: quantile (toward the anchor's own batch estimate
    # of its (1 - alpha) quantile, weighted by fnd.quantile_weight) | adam | sgd (the paper's
    # stochastic step of fnd.lr) | auto (quantile where a similarity row, with fnd.queue,
    # expects at least one flag, alpha x (negatives + queue + 1) >= 1; adam below that and
    # with fnd.init=constant, the paper's rule)
    optimizer: str = "auto"
    # quantile: the weight of a visit's estimate, once 1 / (the sample's visits) falls below it
    # (until then the mean of its visits): 0.7 follows the similarities as the model trains
    # (docs/results.md, "GloFND per anchor": 0.7 over 0.5 on the long tail, 3 seeds)
    quantile_weight: float = 0.7
    # quantile: a visit's estimate also reads the columns of the last global batches (their
    # features, detached; at most this many per anchor type, 0: none): more negatives per
    # estimate, and the quantile rule where a batch alone holds less than one flag per row
    queue: int = 1024
    beta1: float = 0.9
    beta2: float = 0.98
    init_threshold: float = 1.0  # fnd.init=constant: every threshold's start
    # a threshold's start: constant (fnd.init_threshold, the paper's) | quantile (at the
    # sample's first visit, the (1 - alpha) quantile of its similarities to the batch's
    # negatives) | shared (at its first visit, that quantile over the whole global batch)
    init: str = "quantile"
    # add to the thresholds of each anchor type an offset re-estimated every step: the
    # (1 - alpha) quantile of similarity less threshold over the global batch's negatives. It
    # follows the similarities as the model trains, where a threshold moves once per visit
    offset: bool = True
    # Adam bias correction of the thresholds: sample (updates the sample has received, the
    # Adam rule) | epoch (t = epoch + 1, as GloFND's reference code; for exact reproduction)
    bias_correction: str = "sample"
    start_update: int = 0  # epoch from which thresholds are learned
    # when flagged negatives start being removed: an epoch (>= start_update), a share of the
    # run's optimiser steps (0.3 or "30%"), or auto (glofnd: once the flagged share has stayed
    # within 0.75-1.33 x alpha for fnd.start_mask_window steps in a row)
    start_mask: Union[int, float, str] = 0  # noqa: UP007 (OmegaConf reads typing.Union)
    start_mask_window: int | None = None  # start_mask=auto: steps in a row (null: one epoch)
    # GloFND's per-anchor calibration while training (docs/methods.md, "Per-anchor
    # calibration"): at each epoch's end (and every calibration_every optimiser steps when set)
    # the first calibration_bank readable training samples are encoded un-augmented, and
    # calibration_anchors of them (fixed, drawn by the seed) are measured against all of them:
    # fnd/anchors_img_within, its one-global-threshold counterfactual, ... (0 bank: off)
    calibration_every: int = 0
    calibration_bank: int = 1024
    calibration_anchors: int = 256
    # the image view a detector reads (image-text): train (the augmented view the loss sees) |
    # clean (the evaluation transform's resize and centre crop, one more image-tower forward
    # without gradient per step) | auto (clean for glofnd, train otherwise)
    view: str = "auto"
    removal: str = "eliminate"  # eliminate | attract
    rescale: bool = True  # eliminate: rescale the kept negative sum to the full count
    state_on_cpu: bool = False  # keep per-sample tables in host memory (huge datasets)
    # replicated (every rank holds every row) | sharded (rank r holds rows n % world == r;
    # each step fetches and returns the batch's rows, O(B); GloFND, oracle and none)
    state: str = "replicated"
    # IFND (simclr mode): clusters the whole training set every cluster_every epochs from
    # start_update; flags from start_mask; accepted share rises from accept_start to 1.0
    num_clusters: list[int] = field(default_factory=lambda: [10, 25, 50])  # the hierarchy
    cluster_every: int = 1
    accept_start: float = 0.0
    match: str = "any"  # any | all: the granularities at which a pair must share a cluster
    kmeans_iters: int = 50
    kmeans_backend: str = "auto"  # auto (faiss when installed) | torch | faiss


@dataclass
class TrainConfig:
    epochs: int = 1
    max_steps: int | None = None  # stop after this many optimiser steps in all
    mixed_precision: str = "no"  # no | fp16 | bf16 (through Accelerate)
    log_every: int = 10
    checkpoint_every: int = 200  # optimiser steps; 0: only at the end
    keep_checkpoints: int = 3
    max_nonfinite_steps: int = 5  # skipped non-finite steps in a row before the run stops
    progress: bool = True
    # activation (gradient) checkpointing in the towers: less memory, one more forward in the
    # backward pass (open_clip's --grad-checkpointing; towers that support it)
    grad_checkpointing: bool = False
    # torch.compile of the model's forward (nn.Module.compile: the state dict keeps its keys, so
    # checkpoints and exports are unchanged); independent of accelerate launch's --dynamo_backend
    compile: bool = False
    compile_backend: str = "inductor"  # torch.compile's backend: inductor | aot_eager | ...
    # where the scalars of metrics.jsonl also go, through Accelerate's trackers: tensorboard
    # (RUN/tensorboard) | wandb (pip install 'clipfnd[wandb]'; WANDB_MODE=offline works without
    # a network) | none; several comma-separated, e.g. "tensorboard,wandb"
    report_to: str = "tensorboard"
    plots: bool = True  # PNG plots of the metrics in RUN/plots after every epoch (rank 0)
    tensorboard: bool | None = None  # deprecated: train.report_to=none for false


@dataclass
class EvalConfig:
    # clip: retrieval | zeroshot (default retrieval); simclr: knn | linear-probe (default knn),
    # fitted on data.train's un-augmented images
    tasks: list[str] | None = None
    at_end: bool = True  # eval.tasks on data.val after training
    every_steps: int = 0  # also every N optimiser steps (0: never)
    every_epochs: int = 0  # also after every N epochs (0: never)
    batch_size: int = 256
    num_workers: int = 0
    # zeroshot on a data.val without class names: a file of names (one a line, or a JSON
    # list), or imagenet (open_clip's list); null: data.val's own
    classnames: str | None = None


@dataclass
class Config:
    mode: str = "clip"  # clip (image-text) | simclr (vision-only, two views per image)
    output_dir: str = "runs/default"
    seed: int = 0
    resume: str | None = None  # latest | a checkpoint folder | null
    overwrite: bool = False  # allow a fresh run in a folder that holds another run
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    fnd: FNDConfig = field(default_factory=FNDConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)


@dataclass(frozen=True)
class MaskStart:
    """When flags start being used (``fnd.start_mask``): at an ``epoch`` (an integer), after a
    ``fraction`` of the run's optimiser steps (``0.3`` or ``"30%"``), or ``auto``: once the
    flagged share has stayed calibrated (within ``CALIBRATED`` of alpha) for a window of
    steps."""

    kind: str  # epoch | fraction | auto
    value: float = 0.0

    @classmethod
    def parse(cls, spec: int | float | str) -> MaskStart:
        """``ValueError`` naming the forms accepted for anything else."""
        forms = "an epoch (an integer >= 0), a share of training (0.3 or 30%), or auto"
        if isinstance(spec, bool):
            raise ValueError(f"fnd.start_mask={spec!r}: give {forms}")
        if isinstance(spec, int):
            if spec < 0:
                raise ValueError(f"fnd.start_mask={spec}: give {forms}")
            return cls("epoch", spec)
        if isinstance(spec, str):
            text = spec.strip().lower()
            if text == "auto":
                return cls("auto")
            if text.endswith("%"):
                try:
                    spec = float(text[:-1]) / 100
                except ValueError:
                    raise ValueError(f"fnd.start_mask={spec!r}: give {forms}") from None
            else:
                try:
                    return cls.parse(int(text))
                except ValueError:
                    raise ValueError(f"fnd.start_mask={spec!r}: give {forms}") from None
        if isinstance(spec, float):
            if not 0 <= spec < 1 or math.isnan(spec):
                raise ValueError(
                    f"fnd.start_mask={spec}: a share of training is in [0, 1) (or [0%, 100%)); "
                    "give an epoch as an integer"
                )
            return cls("fraction", spec)
        raise ValueError(f"fnd.start_mask={spec!r}: give {forms}")

    def first_step(self, total_steps: int) -> int:
        """The first optimiser step (1-based) that masks, for a ``fraction``."""
        return math.floor(self.value * total_steps) + 1

    def __str__(self) -> str:
        if self.kind == "epoch":
            return f"epoch {int(self.value)}"
        return f"{self.value:.0%} of training" if self.kind == "fraction" else "auto"


MODES = ("clip", "simclr")
DEFAULT_MODEL = {"clip": "clipfnd-tiny-vit", "simclr": "tiny"}
DEFAULT_LOSS = {"clip": "clip", "simclr": "simclr"}
EVAL_TASKS = {"clip": ("retrieval", "zeroshot"), "simclr": ("knn", "linear-probe")}
# keys whose default depends on ``mode`` (``clipfnd train --help`` says so)
BY_MODE = {
    "model.name": DEFAULT_MODEL,
    "loss.name": DEFAULT_LOSS,
    "eval.tasks": {m: f"[{t[0]}]" for m, t in EVAL_TASKS.items()},
}
# the global losses keep exp((s_ij - s_ip) / tau) in float32 (their u estimators): below this
# temperature it overflows as soon as a negative is 88.7 tau more similar than the positive
GLOBAL_LOSS_MIN_TAU = 0.01
CHOICES: dict[str, tuple[str, ...]] = {
    "mode": MODES,
    "data.on_error": ("skip", "raise"),
    "optim.name": ("adamw", "sgd", "lars"),
    "optim.schedule": ("cosine", "constant"),
    "optim.accum_mode": ("cached", "independent"),
    "loss.tau_schedule": ("model", "fastclip"),
    "fnd.bias_correction": ("sample", "epoch"),
    "fnd.init": ("constant", "quantile", "shared"),
    "fnd.optimizer": ("auto", "quantile", "adam", "sgd"),
    "fnd.removal": ("eliminate", "attract"),
    "fnd.view": ("auto", "train", "clean"),
    "fnd.match": ("any", "all"),
    "fnd.kmeans_backend": ("auto", "torch", "faiss"),
    "fnd.state": ("replicated", "sharded"),
    "train.mixed_precision": ("no", "fp16", "bf16"),
}


# keys that hold a list; a bare value given for one (eval.tasks=zeroshot) is read as a list
LIST_KEYS = ("eval.tasks", "fnd.num_clusters", "optim.betas")


def _friendly(e: OmegaConfBaseException, where: str) -> ConfigError:
    key = getattr(e, "full_key", None) or getattr(e, "key", None)
    msg = (getattr(e, "msg", None) or str(e)).strip().splitlines()[0]
    if type(e).__name__ == "ConfigKeyError" or "not in" in msg:
        return ConfigError(
            f"{where}: unknown config key '{key}' ({msg}). Top-level keys: "
            f"{', '.join(f.name for f in Config.__dataclass_fields__.values())}"
        )
    return ConfigError(f"{where}: bad value for '{key}': {msg}")


def load_config(
    path: str | os.PathLike | None = None, overrides: list[str] | None = None
) -> Config:
    """Build the run config: schema defaults, then the YAML file, then ``key=value`` overrides."""
    cfg = OmegaConf.structured(Config)
    if path is not None:
        p = Path(path)
        if not p.exists():
            raise ConfigError(f"config file {p} does not exist")
        try:
            file_cfg = OmegaConf.load(p)
        except Exception as e:
            raise ConfigError(f"{p} is not valid YAML: {e}") from e
        if not isinstance(file_cfg, DictConfig):
            raise ConfigError(
                f"{p}: the top level must be a mapping of keys (model:, data:, ...), not a "
                f"{type(file_cfg).__name__.replace('Config', '').lower() or 'value'}"
            )
        for key in LIST_KEYS:  # a bare value where a list goes: a list of that one value
            node = OmegaConf.select(file_cfg, key, default=None)
            if node is not None and not isinstance(node, ListConfig):
                OmegaConf.update(file_cfg, key, [node], merge=False)
        try:
            cfg = OmegaConf.merge(cfg, file_cfg)
        except OmegaConfBaseException as e:
            raise _friendly(e, str(p)) from e
    for item in overrides or []:
        if "=" not in item:
            raise ConfigError(
                f"override {item!r} is not of the form key=value (e.g. optim.lr=1e-3)"
            )
        key, value = item.split("=", 1)
        if key.strip() in LIST_KEYS and value.strip() and not value.strip().startswith("["):
            item = f"{key}=[{value}]"  # eval.tasks=zeroshot means [zeroshot]; a,b means [a,b]
        try:
            cfg = OmegaConf.merge(cfg, OmegaConf.from_dotlist([item]))
        except OmegaConfBaseException as e:
            raise _friendly(e, f"override {item!r}") from e
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ConfigError(
            f"config keys without a value: {', '.join(missing)} (e.g. data.train=PATH)"
        )
    obj: Config = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    validate(obj)
    return obj


def validate(cfg: Config) -> None:
    """Checks that need more than a type: choices, ranges, and keys that depend on each other."""

    def get(dotted: str) -> Any:
        node: Any = cfg
        for part in dotted.split("."):
            node = getattr(node, part)
        return node

    if cfg.mode not in MODES:
        raise ConfigError(f"mode={cfg.mode!r} is not one of {', '.join(MODES)}")
    if cfg.model.name is None:  # the mode's defaults, written into the config the run saves
        cfg.model.name = DEFAULT_MODEL[cfg.mode]
    if cfg.loss.name is None:
        cfg.loss.name = DEFAULT_LOSS[cfg.mode]
    for key, choices in CHOICES.items():
        if get(key) not in choices:
            raise ConfigError(f"{key}={get(key)!r} is not one of {', '.join(choices)}")
    if cfg.fnd.state == "sharded" and cfg.fnd.detector == "ifnd":
        raise ConfigError(
            "fnd.state=sharded does not work with fnd.detector=ifnd: IFND clusters and ranks "
            "the whole training set, so every process needs every row; use fnd.state=replicated"
        )
    if cfg.fnd.view == "clean" and (cfg.mode, cfg.fnd.detector) != ("clip", "glofnd"):
        raise ConfigError(
            f"fnd.view=clean is for GloFND in image-text training (mode=clip, "
            f"fnd.detector=glofnd), not mode={cfg.mode} with fnd.detector={cfg.fnd.detector}: "
            "vision-only training detects on its two views; use fnd.view=train or auto"
        )
    positive = [
        "data.batch_size",
        "data.chunk_size",
        "optim.accum_steps",
        "train.epochs",
        "train.log_every",
        "eval.batch_size",
        "train.keep_checkpoints",
        "train.max_nonfinite_steps",
    ]
    for key in positive:
        if get(key) < 1:
            raise ConfigError(f"{key} must be >= 1, got {get(key)}")
    for key in [
        "data.num_workers",
        "data.retries",
        "optim.warmup_steps",
        "train.checkpoint_every",
        "eval.every_steps",
        "fnd.start_update",
        "optim.weight_decay",
        "eval.every_epochs",
        "data.augment_strength",
    ]:
        if get(key) < 0:
            raise ConfigError(f"{key} must be >= 0, got {get(key)}")
    tasks = EVAL_TASKS[cfg.mode]
    if cfg.eval.tasks is None:
        cfg.eval.tasks = [tasks[0]]
    bad_tasks = [t for t in cfg.eval.tasks if t not in tasks]
    if bad_tasks or not cfg.eval.tasks:
        other = "linear-probe and knn" if cfg.mode == "clip" else "retrieval and zeroshot"
        raise ConfigError(
            f"eval.tasks={cfg.eval.tasks}: in mode {cfg.mode} each must be one of "
            f"{', '.join(tasks)} ({other} run with `clipfnd eval`)"
        )
    if cfg.mode == "simclr":
        _validate_simclr(cfg)
        locks = [k for k in ("lock_image", "lock_text") if getattr(cfg.model, k)]
        if locks:
            raise ConfigError(
                f"model.{locks[0]} freezes a tower of a CLIP model (mode clip); a vision-only "
                "run trains its one encoder"
            )
    for key in ("model.lock_image_unlocked_groups", "model.lock_text_unlocked_layers"):
        if get(key) < 0:
            raise ConfigError(f"{key} must be >= 0, got {get(key)}")
    if cfg.optim.lr <= 0:
        raise ConfigError(f"optim.lr must be > 0, got {cfg.optim.lr}")
    if len(cfg.optim.betas) != 2 or not all(0 <= b < 1 for b in cfg.optim.betas):
        raise ConfigError(f"optim.betas must be two numbers in [0, 1), got {cfg.optim.betas}")
    if not 0 < cfg.fnd.alpha < 1:
        raise ConfigError(f"fnd.alpha must be in (0, 1), got {cfg.fnd.alpha}")
    if cfg.fnd.lr <= 0:
        raise ConfigError(f"fnd.lr must be > 0, got {cfg.fnd.lr}")
    for key in ("calibration_every", "calibration_bank", "calibration_anchors", "queue"):
        if getattr(cfg.fnd, key) < 0:
            raise ConfigError(f"fnd.{key} must be >= 0, got {getattr(cfg.fnd, key)}")
    if not 0 < cfg.fnd.quantile_weight <= 1:
        raise ConfigError(f"fnd.quantile_weight must be in (0, 1], got {cfg.fnd.quantile_weight}")
    if not (0 <= cfg.fnd.beta1 < 1 and 0 <= cfg.fnd.beta2 < 1):
        raise ConfigError("fnd.beta1 and fnd.beta2 must be in [0, 1)")
    try:
        mask_start = MaskStart.parse(cfg.fnd.start_mask)
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if mask_start.kind == "epoch" and mask_start.value < cfg.fnd.start_update:
        raise ConfigError(
            f"fnd.start_mask ({cfg.fnd.start_mask}) must be >= fnd.start_update "
            f"({cfg.fnd.start_update}): masks come from thresholds that have started learning"
        )
    if cfg.fnd.start_mask_window is not None and cfg.fnd.start_mask_window < 1:
        raise ConfigError(
            f"fnd.start_mask_window must be >= 1 or null, got {cfg.fnd.start_mask_window}"
        )
    if not 0 < cfg.loss.tau <= 1:
        raise ConfigError(f"loss.tau must be in (0, 1], got {cfg.loss.tau}")
    if not 0 < cfg.loss.gamma_min <= 1:
        raise ConfigError(f"loss.gamma_min must be in (0, 1], got {cfg.loss.gamma_min}")
    if not cfg.loss.tau_min > 0:
        raise ConfigError(f"loss.tau_min must be > 0, got {cfg.loss.tau_min}")
    if cfg.loss.name == "fastclip_v3" and cfg.loss.tau_min > cfg.loss.tau:
        raise ConfigError(
            f"loss.tau_min={cfg.loss.tau_min} is above loss.tau={cfg.loss.tau}, the learned "
            "temperature's start: lower loss.tau_min"
        )
    low = {"sogclr": "loss.tau", "fastclip_v3": "loss.tau_min"}.get(cfg.loss.name)
    if low is not None and get(low) < GLOBAL_LOSS_MIN_TAU:
        raise ConfigError(
            f"{low}={get(low)} with loss.name={cfg.loss.name}: below {GLOBAL_LOSS_MIN_TAU} the "
            "global loss's u estimator overflows float32 once a negative is 88.7 x tau more "
            f"similar than its positive; use {low} >= {GLOBAL_LOSS_MIN_TAU}"
        )
    if cfg.optim.grad_clip is not None and not cfg.optim.grad_clip > 0:
        raise ConfigError(
            f"optim.grad_clip must be > 0 (the largest gradient norm) or null (no clipping), "
            f"got {cfg.optim.grad_clip}"
        )
    if not cfg.optim.eps > 0:
        raise ConfigError(f"optim.eps must be > 0, got {cfg.optim.eps}")
    if not 0 <= cfg.optim.momentum < 1:
        raise ConfigError(f"optim.momentum must be in [0, 1), got {cfg.optim.momentum}")
    if not -1 <= cfg.fnd.init_threshold <= 1:
        raise ConfigError(
            f"fnd.init_threshold must be in [-1, 1] (a cosine similarity), got "
            f"{cfg.fnd.init_threshold}"
        )
    for key in ("loss.rho", "loss.gamma_decay_epochs"):
        if get(key) < 0:
            raise ConfigError(f"{key} must be >= 0, got {get(key)}")
    if not cfg.loss.tau_lr > 0:
        raise ConfigError(f"loss.tau_lr must be > 0, got {cfg.loss.tau_lr}")
    _check_report_to(cfg)
    _check_output_dir(cfg.output_dir)
    if cfg.train.max_steps is not None and cfg.train.max_steps < 1:
        raise ConfigError(f"train.max_steps must be >= 1 or null, got {cfg.train.max_steps}")
    if cfg.resume not in (None, "latest") and not Path(cfg.resume).is_dir():
        raise ConfigError(f"resume={cfg.resume!r}: use 'latest' or an existing checkpoint folder")


TRACKERS = ("tensorboard", "wandb")


def _tracker_names(value: str) -> list[str]:
    return [n.strip() for n in str(value).split(",") if n.strip()]


def report_to(cfg: Config) -> list[str]:
    """The trackers ``train.report_to`` names (none: an empty list)."""
    names = _tracker_names(cfg.train.report_to)
    return [] if names == ["none"] else names


def _check_report_to(cfg: Config) -> None:
    if cfg.train.tensorboard is not None:  # the key this one replaced, still read
        if not cfg.train.tensorboard:
            kept = [n for n in report_to(cfg) if n != "tensorboard"]
            cfg.train.report_to = ",".join(kept) or "none"
        cfg.train.tensorboard = None
    names = _tracker_names(cfg.train.report_to)
    bad = [n for n in names if n not in (*TRACKERS, "none")]
    if bad or not names or ("none" in names and len(names) > 1):
        raise ConfigError(
            f"train.report_to={cfg.train.report_to!r}: give none, or one or more of "
            f"{', '.join(TRACKERS)} separated by commas"
        )
    if "wandb" in names and importlib.util.find_spec("wandb") is None:
        raise ConfigError(
            "train.report_to names wandb, which is not installed: pip install 'clipfnd[wandb]' "
            "(or choose train.report_to=tensorboard)"
        )


def _check_output_dir(output_dir: str) -> None:
    """``output_dir`` must be a folder that exists or can be made: nothing on its path may be a
    file, and its nearest existing folder must be writable."""
    path = Path(output_dir)
    for parent in (path, *path.parents):
        if parent.exists():
            if not parent.is_dir():
                raise ConfigError(f"output_dir={output_dir!r}: {parent} is a file, not a folder")
            if not os.access(parent, os.W_OK | os.X_OK):
                raise ConfigError(f"output_dir={output_dir!r}: {parent} is not writable")
            return


def eval_tasks(cfg: Config) -> list[str]:
    """``eval.tasks``, or the mode's default task when unset."""
    return list(cfg.eval.tasks) if cfg.eval.tasks else [EVAL_TASKS[cfg.mode][0]]


def _validate_simclr(cfg: Config) -> None:
    if cfg.data.image_size < 8:
        raise ConfigError(f"data.image_size must be >= 8, got {cfg.data.image_size}")
    if not 0 < cfg.data.crop_min_scale <= 1:
        raise ConfigError(f"data.crop_min_scale must be in (0, 1], got {cfg.data.crop_min_scale}")
    if not 0 <= cfg.loss.tau_plus < 1:
        raise ConfigError(f"loss.tau_plus must be in [0, 1), got {cfg.loss.tau_plus}")
    if cfg.loss.beta < 0:
        raise ConfigError(f"loss.beta must be >= 0, got {cfg.loss.beta}")
    if cfg.loss.name in ("dcl", "hcl", "sscl") and cfg.fnd.removal != "eliminate":
        raise ConfigError(
            f"loss.name={cfg.loss.name} removes flagged false negatives from its negative pool "
            "only (fnd.removal=eliminate); attract is defined for simclr and sogclr"
        )
    if cfg.loss.name == "sscl" and cfg.loss.top_k < 2:
        raise ConfigError(f"loss.top_k must be >= 2 (pairs are mixed), got {cfg.loss.top_k}")
    if not cfg.fnd.num_clusters or any(k < 2 for k in cfg.fnd.num_clusters):
        raise ConfigError(
            f"fnd.num_clusters={cfg.fnd.num_clusters}: give one or more cluster counts >= 2"
        )
    if not 0 <= cfg.fnd.accept_start <= 1:
        raise ConfigError(f"fnd.accept_start must be in [0, 1], got {cfg.fnd.accept_start}")


def to_yaml(cfg: Config) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def to_dict(cfg: Config) -> dict[str, Any]:
    return OmegaConf.to_container(OmegaConf.structured(cfg))  # type: ignore[return-value]


def from_dict(d: dict[str, Any]) -> Config:
    """A config saved with a checkpoint, read back through the schema."""
    base = OmegaConf.structured(Config)
    try:
        merged: DictConfig = OmegaConf.merge(base, OmegaConf.create(d))
    except OmegaConfBaseException as e:
        raise _friendly(e, "saved config") from e
    return OmegaConf.to_object(merged)  # type: ignore[return-value]


def describe_keys() -> list[tuple[str, str, str]]:
    """``(dotted key, default, what it is)`` for every key of the schema, in schema order; the
    text is the key's comment in this file (the line's own, else the comment lines above it),
    so ``clipfnd train --help`` and the schema never disagree."""
    import dataclasses
    import inspect
    import io
    import tokenize

    def comments(cls: type) -> dict[str, str]:
        src = inspect.getsource(cls)
        out: dict[str, str] = {}
        above: list[str] = []
        lines: dict[int, str] = {}
        for tok in tokenize.generate_tokens(io.StringIO(src).readline):
            if tok.type == tokenize.COMMENT:
                lines[tok.start[0]] = tok.string.lstrip("#").strip()
        for i, line in enumerate(src.splitlines(), start=1):
            stripped = line.strip()
            if stripped.startswith("#"):
                above.append(lines.get(i, ""))
                continue
            name = stripped.split(":", 1)[0].strip()
            if ":" in stripped and name.isidentifier():
                own = lines.get(i)
                out[name] = own if own else " ".join(above)
            above = []
        return out

    def walk(cls: type, prefix: str) -> list[tuple[str, str, str]]:
        notes = comments(cls)
        rows = []
        for f in dataclasses.fields(cls):
            if f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
                default = f.default_factory()  # type: ignore[misc]
            else:
                default = f.default
            if dataclasses.is_dataclass(default):
                rows += walk(type(default), f"{prefix}{f.name}.")
                continue
            if f.name == "tensorboard":  # the deprecated key
                continue
            key = f"{prefix}{f.name}"
            if key in BY_MODE:
                text = (
                    "(by mode: " + ", ".join(f"{m} -> {v}" for m, v in BY_MODE[key].items()) + ")"
                )
            else:
                text = "(required)" if default is MISSING else repr(default).replace("'", "")
            rows.append((key, text, notes.get(f.name, "")))
        return rows

    return walk(Config, "")


def detection_view(cfg: Config) -> str:
    """``fnd.view`` resolved: ``clean`` (GloFND reads the un-augmented image, one more
    image-tower forward without gradient a step) or ``train`` (the view the loss sees)."""
    if cfg.fnd.view != "auto":
        return cfg.fnd.view
    return "clean" if (cfg.mode, cfg.fnd.detector) == ("clip", "glofnd") else "train"
