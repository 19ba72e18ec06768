from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import pytest
import yaml

from ldm.core.config import REPO_ROOT, config_to_dict, load_config, save_config
from ldm.core.errors import ConfigError
from ldm.phases.train_vae_pair import TrainVAEConfig
from tests.helpers.cli import ROOT


@dataclass(frozen=True)
class Train:
    steps: int = 10
    lr: float = 1e-3
    amp: bool = False
    betas: tuple[float, float] = (0.9, 0.99)
    mode: Literal["a", "b"] = "a"

    def __post_init__(self) -> None:
        if self.steps < 1:
            raise ConfigError(f"steps must be >= 1, got {self.steps}")


@dataclass(frozen=True)
class Cfg:
    out_dir: Path = Path("results/x")
    seed: int = 0
    shape: tuple[int, ...] = (8, 8)
    note: str | None = None
    train: Train = field(default_factory=Train)


def write(tmp_path: Path, text: str) -> Path:
    p = tmp_path / "c.yaml"
    p.write_text(text)
    return p


def test_defaults_and_path_resolution(tmp_path):
    cfg = load_config(Cfg, write(tmp_path, "seed: 3\n"))
    assert cfg.seed == 3 and cfg.train == Train()
    assert cfg.out_dir == Path.cwd() / "results/x"
    cfg = load_config(Cfg, write(tmp_path, "out_dir: results/y\n"))
    assert cfg.out_dir == Path.cwd() / "results/y"


def test_nested_values_are_typed(tmp_path):
    cfg = load_config(Cfg, write(tmp_path, "train: {steps: 5, lr: 1, betas: [0.5, 0.6]}\n"))
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.betas == (0.5, 0.6)


def test_set_overrides_parse_yaml_values(tmp_path):
    cfg = load_config(
        Cfg, write(tmp_path, "seed: 1\n"), ["train.steps=7", "shape=[4, 5, 6]", "note=hello"]
    )
    assert cfg.train.steps == 7 and cfg.shape == (4, 5, 6) and cfg.note == "hello"


def test_unknown_key_names_file_key_and_closest(tmp_path):
    p = write(tmp_path, "train:\n  stesp: 5\n")
    with pytest.raises(
        ConfigError, match=r"c\.yaml: unknown key 'train\.stesp' \(did you mean 'steps'"
    ):
        load_config(Cfg, p)


def test_unknown_override_key(tmp_path):
    with pytest.raises(ConfigError, match="unknown key 'sed'.*'seed'"):
        load_config(Cfg, write(tmp_path, ""), ["sed=3"])


def test_wrong_type_names_key_expected_and_got(tmp_path):
    with pytest.raises(ConfigError, match=r"key 'train\.steps' expects int, got str 'many'"):
        load_config(Cfg, write(tmp_path, "train: {steps: many}\n"))
    with pytest.raises(ConfigError, match="key 'train.amp' expects bool"):
        load_config(Cfg, write(tmp_path, "train: {amp: 3}\n"))
    with pytest.raises(ConfigError, match="expects 2 values"):
        load_config(Cfg, write(tmp_path, "train: {betas: [1, 2, 3]}\n"))
    with pytest.raises(ConfigError, match="must be one of 'a', 'b'"):
        load_config(Cfg, write(tmp_path, "train: {mode: c}\n"))


def test_validation_error_is_prefixed_with_file_and_section(tmp_path):
    with pytest.raises(ConfigError, match=r"c\.yaml: train\.steps must be >= 1"):
        load_config(Cfg, write(tmp_path, "train: {steps: 0}\n"))


def test_missing_and_invalid_files(tmp_path):
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(Cfg, tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match="not valid YAML at line"):
        load_config(Cfg, write(tmp_path, "a: 1\nb: [\n"))
    with pytest.raises(ConfigError, match="expected key.sub=value"):
        load_config(Cfg, write(tmp_path, ""), ["seed"])


def test_save_config_round_trip(tmp_path):
    cfg = load_config(Cfg, write(tmp_path, "seed: 4\ntrain: {lr: 0.5}\n"), ["note=x"])
    out = save_config(cfg, tmp_path / "out" / "config.yaml")
    assert load_config(Cfg, out) == cfg
    assert yaml.safe_load(out.read_text()) == config_to_dict(cfg)


def _shipped_configs() -> list:
    from ldm.cli.run_all import PROFILE_DIRS
    from ldm.core.registry import PHASES

    return [pytest.param(profile, phase, id=f"{profile}-{phase.name}")
            for profile in PROFILE_DIRS for phase in PHASES]  # fmt: skip


@pytest.mark.parametrize(("profile", "phase"), _shipped_configs())
def test_every_shipped_config_loads(profile, phase):
    """configs/, configs/demo/ and configs/mri/ hold a YAML for every phase that loads with its
    phase's dataclass (run_all --profile reads them)."""
    from ldm.cli.run_all import config_path

    path = config_path(profile, phase)
    assert path.is_file(), path
    cfg = load_config(phase.config_cls(), path)
    if phase.name == "train_vae_pair":  # the restorer + residual autoencoder design
        assert cfg.model.restorer.uses_lr and not cfg.model.residual_ae.uses_lr


@pytest.mark.parametrize(
    ("profile", "phase"), [p for p in _shipped_configs() if p.values[0] == "default"]
)
def test_the_default_configs_are_the_dataclass_defaults(profile, phase):
    """One source of defaults: configs/<phase>.yaml only documents the dataclass defaults, so a
    short config (or none) gets the shipped model, and a section given in part keeps the
    phase's own defaults for the keys it leaves out (train_vae_pair's train.steps is 1200, not
    TrainConfig's)."""
    from ldm.cli.run_all import config_path

    cls = phase.config_cls()
    shipped = load_config(cls, config_path(profile, phase))
    assert config_to_dict(shipped) == config_to_dict(load_config(cls, None))
    partial = load_config(cls, None, ["train.seed=3"] if hasattr(shipped, "train") else [])
    if hasattr(shipped, "train"):
        assert partial.train.steps == shipped.train.steps and partial.train.seed == 3


def test_relative_paths_resolve_against_the_current_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = load_config(Cfg, write(tmp_path, "out_dir: runs/a\n"))
    assert cfg.out_dir == tmp_path / "runs/a"


def test_a_bad_choice_in_a_real_config_names_the_full_key() -> None:
    from ldm.phases.predict_ldm import PredictConfig
    from ldm.phases.train_diffusion import TrainDiffusionConfig

    path = REPO_ROOT / "configs" / "demo" / "train_diffusion.yaml"
    with pytest.raises(ConfigError) as e:
        load_config(TrainDiffusionConfig, path, ["diffusion.prediction_type=vv"])
    msg = str(e.value)
    assert "train_diffusion.yaml: diffusion.prediction_type must be one of epsilon, v" in msg
    assert "'vv'" in msg
    with pytest.raises(ConfigError, match=r"diffusion\.beta_start and beta_end must satisfy"):
        load_config(TrainDiffusionConfig, path, ["diffusion.beta_start=0.5"])
    # keys of the earlier design are unknown keys, named in full
    stale = r"train_diffusion\.yaml: unknown key 'diffusion\.target'"
    with pytest.raises(ConfigError, match=stale):
        load_config(TrainDiffusionConfig, path, ["diffusion.target=residual"])
    predict = REPO_ROOT / "configs" / "demo" / "predict_ldm.yaml"
    with pytest.raises(ConfigError) as e:
        load_config(PredictConfig, predict, ["sampler.init=cond", "sampler.t_start=300"])
    msg = str(e.value)
    assert "predict_ldm.yaml: sampler.init must be one of noise, restorer, got 'cond'" in msg


def test_float_keys_accept_yaml_exponent_strings_and_messages_name_keys_once(tmp_path):
    path = ROOT / "configs" / "train_vae_pair.yaml"
    assert load_config(TrainVAEConfig, path, ["train.lr=1e-3"]).train.lr == 1e-3
    with pytest.raises(ConfigError) as e:
        load_config(TrainVAEConfig, path, ["train.steps=0"])
    assert "train.steps must be >= 1" in str(e.value) and "train.train." not in str(e.value)
