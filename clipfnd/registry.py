"""The names a config may give for ``loss.name`` and ``fnd.detector``, checked against the
registries (``clipfnd.methods.METHODS``, ``clipfnd.fnd.DETECTORS``).

``clipfnd.config`` checks everything a value alone decides and imports nothing of clipfnd's
(loading a config needs no torch); the choices that only the registries know are checked
here, where a run, a report or a resume is built: ``load_run_config`` is ``load_config``
followed by ``check_choices``.
"""

from __future__ import annotations

import os

from .config import Config, ConfigError, MaskStart, load_config
from .fnd import DETECTORS
from .methods import METHODS


def check_choices(cfg: Config) -> None:
    """``loss.name`` and ``fnd.detector`` name a registered method and detector that serve
    ``cfg.mode``, and ``fnd.start_mask=auto`` has a detector that measures calibration."""
    chosen = (("loss.name", METHODS, cfg.loss.name), ("fnd.detector", DETECTORS, cfg.fnd.detector))
    for key, registry, name in chosen:
        if name not in registry:
            raise ConfigError(f"{key}={name!r} is not one of {', '.join(registry)}")
    for key, registry, name in chosen:
        modes = registry[name].modes
        if cfg.mode not in modes:
            fits = [n for n, c in registry.items() if cfg.mode in c.modes]
            raise ConfigError(
                f"{key}={name!r} is for mode {' or '.join(modes)}, and this run has "
                f"mode={cfg.mode!r}; in mode {cfg.mode} choose one of {', '.join(fits)}"
            )
    auto = MaskStart.parse(cfg.fnd.start_mask).kind == "auto"
    if auto and not DETECTORS[cfg.fnd.detector].calibrates:
        raise ConfigError(
            f"fnd.start_mask=auto with fnd.detector={cfg.fnd.detector}: auto waits until the "
            "flagged share is calibrated, which only glofnd measures; give an epoch or a share "
            "of training (e.g. 30%)"
        )


def load_run_config(
    path: str | os.PathLike | None = None, overrides: list[str] | None = None
) -> Config:
    """``load_config`` (defaults <- YAML <- ``key=value``), then ``check_choices``."""
    cfg = load_config(path, overrides)
    check_choices(cfg)
    return cfg
