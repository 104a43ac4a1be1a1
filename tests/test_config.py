"""The typed config: defaults <- YAML <- key=value, and misconfiguration refused by name."""

from __future__ import annotations

import pytest

from clipfnd.cli.main import main
from clipfnd.config import ConfigError, detection_view, load_config
from clipfnd.registry import load_run_config


def test_layers_and_types(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  train: /x\n  batch_size: 32\noptim:\n  lr: 1.0e-3\n")
    cfg = load_config(f, ["optim.lr=2e-3", "fnd.detector=glofnd"])
    assert cfg.data.batch_size == 32 and cfg.optim.lr == 2e-3 and cfg.fnd.detector == "glofnd"
    assert cfg.fnd.alpha == 1e-3  # schema default


@pytest.mark.parametrize(
    "override,message",
    [
        ("optim.lrr=1", "unknown config key 'optim.lrr'"),
        ("data.batch_size=abc", "bad value for 'data.batch_size'"),
        ("nope=1", "unknown config key 'nope'"),
        ("fnd.detector=magic", "fnd.detector='magic' is not one of none, glofnd, oracle"),
        ("fnd.alpha=1.5", "fnd.alpha must be in \\(0, 1\\)"),
        ("fnd.start_update=3", "fnd.start_mask \\(0\\) must be >= fnd.start_update \\(3\\)"),
        ("loss.name=infonce", "loss.name='infonce' is not one of"),
        ("data.batch_size=0", "data.batch_size must be >= 1"),
        ("optim.lr", "not of the form key=value"),
        (
            "eval.tasks=[knn]",
            "eval.tasks=\\[.knn.\\]: in mode clip each must be one of retrieval, zeroshot",
        ),
        ("optim.grad_clip=-1", "optim.grad_clip must be > 0"),
        ("optim.eps=0", "optim.eps must be > 0"),
        ("optim.momentum=1.5", "optim.momentum must be in"),
        ("fnd.init_threshold=2", "fnd.init_threshold must be in \\[-1, 1\\]"),
        ("loss.rho=-1", "loss.rho must be >= 0"),
        ("loss.tau_lr=0", "loss.tau_lr must be > 0"),
        ("mode=audio", "mode='audio' is not one of clip, simclr"),
    ],
)
def test_bad_values_are_refused_by_key(override, message):
    with pytest.raises(ConfigError, match=message):
        load_run_config(None, ["data.train=/x", override])


def test_an_output_dir_under_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("")
    with pytest.raises(ConfigError, match="is a file, not a folder"):
        load_config(None, ["data.train=/x", f"output_dir={tmp_path / 'f' / 'run'}"])


def test_a_yaml_whose_top_level_is_not_a_mapping_is_refused(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("- model\n- data\n")
    with pytest.raises(ConfigError, match="the top level must be a mapping of keys"):
        load_config(p)


def test_missing_required_key():
    with pytest.raises(ConfigError, match="data.train"):
        load_config(None, [])


def test_bad_yaml_key_names_the_file(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  train: /x\n  batchsize: 3\n")
    with pytest.raises(ConfigError, match=r"c.yaml: unknown config key 'data.batchsize'"):
        load_config(f)


def test_cli_reports_config_errors_without_traceback(tmp_path, capsys):
    f = tmp_path / "c.yaml"
    f.write_text("data:\n  train: /x\n")
    assert main(["train", str(f), "optim.warmup=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'optim.warmup'" in err and "Traceback" not in err


def test_shipped_configs_validate():
    from pathlib import Path

    from clipfnd.models import check_model_name
    from clipfnd.models.factory import check_pretrained
    from clipfnd.models.vision import backbone

    configs = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
    assert len(configs) >= 10
    for path in configs:
        cfg = load_config(path)
        if cfg.mode == "clip":
            check_model_name(cfg.model.name)
            check_pretrained(cfg.model.name, cfg.model.pretrained)  # a tag open_clip knows
        else:
            backbone(cfg.model.name, cfg.model.small_images)


def test_paper_recipes_follow_the_reference_code():
    """The CC3M recipes reproduce the papers' runs: GloFND's epoch bias correction and
    FastCLIP's temperature schedule (docs/methods.md, "Differences from the reference code")."""
    from pathlib import Path

    configs = Path(__file__).parent.parent / "configs"
    for path in sorted(configs.glob("cc3m_*.yaml")):
        cfg = load_config(path)
        assert cfg.loss.name == "fastclip_v3", path
        assert cfg.fnd.bias_correction == "epoch", path
        assert cfg.loss.tau_schedule == "fastclip", path
    for path in [*configs.glob("cc3m_*.yaml"), *configs.glob("imagenet100_*glofnd.yaml")]:
        cfg = load_config(path)  # the paper's thresholds: a constant start, no offset
        assert (cfg.fnd.init, cfg.fnd.offset) == ("constant", False), path
        assert detection_view(cfg) == "train", path  # on the view the loss sees


def test_every_package_is_installed_and_eval_under_its_own_name():
    """pyproject lists packages by name (setuptools' find cannot install eval/ as
    clipfnd_eval): a new subpackage must be listed, or an installed clipfnd would lack it."""
    from pathlib import Path

    import tomllib

    root = Path(__file__).parent.parent
    tool = tomllib.loads((root / "pyproject.toml").read_text())["tool"]["setuptools"]
    on_disk = {
        ".".join(p.parent.relative_to(root).parts)
        for top in ("clipfnd", "data_pipelines")
        for p in (root / top).rglob("__init__.py")
    }
    assert on_disk | {"clipfnd_eval"} == set(tool["packages"])
    assert tool["package-dir"] == {"clipfnd_eval": "eval"}
    import clipfnd_eval

    assert Path(clipfnd_eval.__file__).parent == root / "eval"


def test_a_bare_value_for_a_list_key_is_a_list_of_it(tmp_path):
    """eval.tasks=zeroshot used to fail with OmegaConf's "AnyNode is not a ListConfig"."""
    assert load_config(None, ["data.train=x", "eval.tasks=zeroshot"]).eval.tasks == ["zeroshot"]
    got = load_config(None, ["data.train=x", "eval.tasks=retrieval,zeroshot"]).eval.tasks
    assert got == ["retrieval", "zeroshot"]
    p = tmp_path / "c.yaml"
    p.write_text("data:\n  train: x\neval:\n  tasks: zeroshot\n")
    assert load_config(p).eval.tasks == ["zeroshot"]


def test_temperatures_the_global_losses_cannot_hold_are_refused_by_key():
    with pytest.raises(ConfigError, match=r"loss.tau=0.005 with loss.name=sogclr: below 0.01"):
        load_config(None, ["data.train=x", "loss.name=sogclr", "loss.tau=0.005"])
    with pytest.raises(ConfigError, match=r"loss.tau_min=0.005 with loss.name=fastclip_v3"):
        load_config(None, ["data.train=x", "loss.name=fastclip_v3", "loss.tau_min=0.005"])
    # losses computed in log space take small temperatures; loss.tau_min is FastCLIP-v3's own
    cfg = load_config(None, ["data.train=x", "mode=simclr", "loss.name=hcl", "loss.tau=0.005"])
    assert cfg.loss.tau == 0.005
