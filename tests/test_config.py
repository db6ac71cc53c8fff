"""The defaults are the paper's setting (docs/DESIGN.md sections 2 and 3): a run that sets nothing trains its model."""

import dataclasses
import inspect
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from began_fast import metrics
from began_fast.config import PRESETS, ConfigError, DataConfig, ModelConfig, TrainConfig, get_preset, replace
from began_fast.fast_step import FastStep
from began_fast.model import Discriminator, Generator
from began_fast.step import ReferenceStep

ROOT = Path(__file__).resolve().parent.parent


def test_train_defaults_are_the_papers():
    cfg = TrainConfig()
    assert (cfg.lr, cfg.betas, cfg.gamma, cfg.lambda_k, cfg.batch_size) == (1e-4, (0.5, 0.999), 0.5, 0.001, 16)
    assert cfg.lr_decay_factor == 0.5  # "halved when M stalls" (DESIGN section 3)


def test_model_defaults_are_the_papers_64px_celeba_model():
    assert dataclasses.asdict(ModelConfig()) == dict(
        image_size=64, n=128, h=64, z_dim=None, skip=False, vanishing_residual=False, carry_steps=16000
    )
    assert ModelConfig().z_size == 64
    assert get_preset("paper64").model == ModelConfig() and get_preset("paper64").train == TrainConfig()
    assert get_preset("paper128").model == ModelConfig(image_size=128)


def test_swd_defaults_are_the_published_methods():
    """Karras et al. 2018: 7x7 neighbourhoods, 128 per image, 4 repeats of 128 random directions."""
    defaults = {name: p.default for name, p in inspect.signature(metrics.swd).parameters.items()}
    assert metrics.PATCH_SIZE == 7
    assert (defaults["descriptors_per_image"], defaults["dir_repeats"], defaults["dirs_per_repeat"]) == (128, 4, 128)


@pytest.mark.parametrize("step_class", [ReferenceStep, FastStep])
def test_both_steps_run_adam_with_the_configs_lr_and_betas(step_class):
    model = ModelConfig(image_size=16, n=2, h=2)
    cfg = TrainConfig(lr=3e-4, betas=(0.3, 0.9), lr_floor=1e-5)
    step = step_class(Generator(model, impl="torch"), Discriminator(model, impl="torch"), cfg, "cpu")
    for optimizer in (step.opt_g, step.opt_d):
        [group] = optimizer.param_groups
        assert group["betas"] == (0.3, 0.9) and float(group["lr"]) == pytest.approx(3e-4)
    assert torch.equal(step.k, torch.zeros(())), "k_0 = 0"


def test_the_readmes_preset_table_is_the_presets():
    """README, Presets: a row per preset, and the values its text says every preset shares."""
    readme = (ROOT / "README.md").read_text()
    for name, preset in PRESETS.items():
        m, t = preset.model, preset.train
        lr = f"{t.lr:.0e}".replace("e-0", "e-")
        cells = [
            f"`{name}`",
            m.image_size,
            m.n,
            m.h,
            m.z_size,
            "yes" if m.skip else "no",
            t.batch_size,
            lr,
            f"{t.gamma:g}",
        ]
        cells += [f"{count:,}" for count in (t.steps, t.lr_decay_window, t.log_every, t.sample_every)]
        cells += [f"{count:,}" for count in (t.checkpoint_every, t.snapshot_every)]
        assert "| " + " | ".join(map(str, cells)) + " |\n" in readme, name
        shared = (t.betas, t.lambda_k, t.lr_decay_factor, t.lr_floor, t.eval_every)
        assert shared == ((0.5, 0.999), 0.001, 0.5, 2e-5, 0), name
    assert DataConfig().flip


def test_presets_are_the_ones_the_readme_describes():
    """README: `demo` is 32 px, n=16 (h = z = 32), with skips, lr 5e-4, gamma 0.7, 6000 steps, M's window 1000 steps
    and a snapshot every 2000; `gpu64` the paper's 64 px model at gamma 0.7; `paper128` the paper's setting at 128 px.
    The lr floor is 2e-5 and evaluations are off (512 images when on) in every preset."""
    demo, gpu64, paper128 = get_preset("demo"), get_preset("gpu64"), get_preset("paper128")
    assert demo.model == ModelConfig(image_size=32, n=16, h=32, skip=True)
    assert (demo.train.lr, demo.train.gamma, demo.train.batch_size, demo.train.steps) == (5e-4, 0.7, 16, 6000)
    assert (demo.train.lr_decay_window, demo.train.snapshot_every) == (1000, 2000)
    assert gpu64.model == ModelConfig()
    assert (gpu64.train.lr, gpu64.train.gamma, gpu64.train.batch_size) == (1e-4, 0.7, 16)
    assert gpu64.train.snapshot_every == 50_000 and gpu64.train.lr_decay_window == 3000
    assert paper128.train == TrainConfig()
    for name in ("demo", "gpu64", "paper64", "paper128"):
        train = get_preset(name).train
        assert (train.lr_floor, train.eval_every, train.eval_images, train.betas) == (2e-5, 0, 512, (0.5, 0.999))
        assert not get_preset(name).model.vanishing_residual
    with pytest.raises(ConfigError, match=r"^unknown preset 'paper32'; expected one of \['demo', 'gpu64', 'paper128'"):
        get_preset("paper32")


@pytest.mark.parametrize(
    "config, changes, message",
    [
        (ModelConfig, {"image_size": 48}, r"image_size must be a power of two in 16\.\.256 .*got 48"),
        (ModelConfig, {"n": 0}, "n must be an integer >= 1, got 0"),
        (ModelConfig, {"h": 2.5}, "h must be an integer >= 1, got 2.5"),
        (ModelConfig, {"z_dim": 0}, "z_dim must be None or an integer >= 1, got 0"),
        (ModelConfig, {"n": True}, "n must be an integer >= 1, got True"),  # an int to Python
        (ModelConfig, {"z_dim": True}, "z_dim must be None or an integer >= 1, got True"),
        (ModelConfig, {"carry_steps": 0}, "carry_steps must be an integer >= 1, got 0"),
        (TrainConfig, {"betas": (0.5, 1.0)}, r"betas must be two numbers in \[0, 1\), got \(0.5, 1.0\)"),
        (TrainConfig, {"betas": (0.9,)}, "betas must be two numbers"),
        (TrainConfig, {"lambda_k": -0.001}, "lambda_k must be a finite number >= 0, got -0.001"),
        (TrainConfig, {"lambda_k": math.inf}, "lambda_k must be a finite number >= 0, got inf"),  # k_t: inf * 0 = NaN
        (TrainConfig, {"gamma": 0.0}, r"gamma must be in \(0, 1\], got 0.0"),
        (TrainConfig, {"lr_decay_window": 0}, "lr_decay_window must be an integer >= 1, got 0"),
        (TrainConfig, {"lr_decay_factor": 1.5}, r"lr_decay_factor must be in \(0, 1\], got 1.5"),
        (TrainConfig, {"lr_decay_factor": 0.0}, r"lr_decay_factor must be in \(0, 1\], got 0.0"),
        (TrainConfig, {"lr_scaling": "cubic"}, "lr_scaling must be one of .*got 'cubic'"),
        (TrainConfig, {"eval_every": -1}, "eval_every must be an integer >= 0, got -1"),
        (TrainConfig, {"eval_images": 0}, "eval_images must be an integer >= 1, got 0"),
        (TrainConfig, {"log_every": 0}, "log_every must be an integer >= 1, got 0"),
        (TrainConfig, {"sample_every": 0}, "sample_every must be an integer >= 1, got 0"),
        (TrainConfig, {"checkpoint_every": 0}, "checkpoint_every must be an integer >= 1, got 0"),
        (TrainConfig, {"snapshot_every": 0}, "snapshot_every must be an integer >= 1, got 0"),
        (DataConfig, {"source": "lmdb"}, "data source must be one of .*got 'lmdb'"),
        (DataConfig, {"crop": "top"}, "crop must be one of .* or None, got 'top'"),
        (DataConfig, {"crop_size": 0}, "crop_size must be None or an integer >= 1, got 0"),
        (DataConfig, {"num_workers": -1}, "num_workers must be None or an integer >= 0, got -1"),
        (DataConfig, {"loader": "ffcv"}, "loader must be one of .*got 'ffcv'"),
        (DataConfig, {"builtin_count": 0}, "builtin_count must be an integer >= 1, got 0"),
        (DataConfig, {"holdout": -1}, "holdout must be an integer >= 0, got -1"),
        # A float is no count even when whole (steps=1e5 reached range() deep in the loop), nor a bool, nor a string.
        (ModelConfig, {"image_size": 64.0}, r"image_size must be an integer in \[16, 256\], got 64.0"),
        (ModelConfig, {"carry_steps": 1e4}, "carry_steps must be an integer >= 1, got 10000.0"),
        (ModelConfig, {"skip": "no"}, "skip must be True or False, got 'no'"),
        (ModelConfig, {"vanishing_residual": 1}, "vanishing_residual must be True or False, got 1"),
        (TrainConfig, {"steps": 1e5}, "steps must be an integer >= 1, got 100000.0"),
        (TrainConfig, {"batch_size": 16.0}, r"batch_size must be an integer in \[1, 1048576\], got 16.0"),
        (TrainConfig, {"batch_size": 2**20 + 1}, r"batch_size must be an integer in \[1, 1048576\], got 1048577"),
        (TrainConfig, {"steps": None}, "steps must be an integer >= 1, got None"),  # None is for optional fields only
        (TrainConfig, {"seed": True}, "seed must be an integer >= 0, got True"),
        (TrainConfig, {"seed": 2**63 - 1}, r"seed must be in \[0, 2\*\*63 - 1\)"),
        (TrainConfig, {"eval_every": 0.5}, "eval_every must be an integer >= 0, got 0.5"),
        (TrainConfig, {"log_every": "50"}, "log_every must be an integer >= 1, got '50'"),
        (DataConfig, {"num_workers": 2.0}, "num_workers must be None or an integer >= 0, got 2.0"),
        (DataConfig, {"builtin_seed": -1}, "builtin_seed must be an integer >= 0, got -1"),
        (DataConfig, {"flip": "False"}, "flip must be True or False, got 'False'"),
    ],
)
def test_a_value_out_of_range_is_refused_in_one_line(config, changes, message):
    with pytest.raises(ConfigError, match=f"^{message}"):
        config(**changes)


def test_the_edges_of_each_range_are_accepted():
    ModelConfig(image_size=16, n=1, h=1, z_dim=1, carry_steps=1)
    ModelConfig(image_size=256)
    TrainConfig(betas=(0.0, 0.0), lambda_k=0.0, gamma=1.0, lr_decay_window=1, lr_decay_factor=1.0, lr_floor=0.0)
    TrainConfig(lr_floor=1e-4, eval_every=0, eval_images=1, log_every=1, snapshot_every=1, lr_scaling="sqrt")
    DataConfig(crop="center", crop_size=1, num_workers=0, builtin_count=1, holdout=0, source="folder", loader="dali")


def test_a_numpy_integer_is_an_integer_and_is_kept_as_a_python_int():
    """A sweep's np.arange gives NumPy integers: accepted, and stored as int (json.dumps of the configs, in
    config.json and the checkpoint, refuses NumPy's)."""
    model = ModelConfig(image_size=np.int64(32), n=np.int32(8), h=np.int64(4), z_dim=np.int64(3))
    train = TrainConfig(batch_size=np.int64(4), steps=np.uint16(10), seed=np.int64(3), eval_every=np.int64(0))
    data = DataConfig(num_workers=np.int64(2), crop_size=np.int64(100), holdout=np.int8(1))
    for config, names in (
        (model, ("image_size", "n", "h", "z_dim")),
        (train, ("batch_size", "steps", "seed", "eval_every")),
        (data, ("num_workers", "crop_size", "holdout")),
    ):
        assert all(type(getattr(config, name)) is int for name in names)
        json.dumps(dataclasses.asdict(config))
    assert (model.image_size, train.steps, data.holdout) == (32, 10, 1)


def test_replace_keeps_the_values_not_given_and_checks_the_result():
    cfg = TrainConfig(batch_size=4, lr=3e-4)
    assert replace(cfg, lr=None, steps=7, gamma=None) == TrainConfig(batch_size=4, lr=3e-4, steps=7)
    with pytest.raises(ConfigError, match=r"gamma must be in \(0, 1\], got 2.0"):
        replace(cfg, gamma=2.0)


def test_a_model_config_describes_itself_in_one_line_for_a_runs_start():
    assert get_preset("paper64").model.describe() == "64 px, n 128, h 64, z 64, no skips"
    assert get_preset("demo").model.describe() == "32 px, n 16, h 32, z 32, skips"
    model = ModelConfig(image_size=16, n=4, h=8, z_dim=3, vanishing_residual=True, carry_steps=500)
    assert model.describe() == "16 px, n 4, h 8, z 3, no skips, vanishing residual over 500 steps"
