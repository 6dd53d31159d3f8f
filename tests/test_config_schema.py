"""The numbers live in configs only: every config key is read by someone, a misspelt or missing key is an
error naming it (and the nearest valid key), and augmentation magnitudes are overridable from the CLI."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from calcjax.core import config as config_schema
from calcjax.data import input_pipeline
from calcjax.model import network as model
from calcjax.train import config as train_config
from calcjax.train import step as train_step
from configs import default, demo, smoke

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("module", [default, smoke, demo], ids=["default", "smoke", "demo"])
def test_every_shipped_config_passes_and_fills_each_dataclass(module):
    c = module.get_config()
    train_config.check_config(c)
    assert model.ModelConfig.from_config(c.model).widths == tuple(c.model.widths)
    assert train_step.LossConfig.from_config(c.loss).k_min == c.loss.k_min
    assert input_pipeline.AugmentConfig.from_config(c.data).rotate_deg == c.data.rotate_deg


@pytest.mark.parametrize(
    "block,key,near",
    [
        ("model", "growth_rat", "growth_rate"),
        ("data", "rotate_degs", "rotate_deg"),
        ("train", "stpes", "steps"),
    ],
)
def test_a_misspelt_key_is_an_error_naming_it_and_the_nearest_valid_one(block, key, near):
    c = smoke.get_config()
    c[block][key] = 1
    with pytest.raises(config_schema.ConfigError, match=rf"{block}\.{key}; did you mean {block}\.{near}\?"):
        train_config.check_config(c)


def test_a_missing_key_is_an_error_naming_it():
    c = smoke.get_config()
    del c.loss["smooth"]
    with pytest.raises(config_schema.ConfigError, match="loss lacks smooth"):
        train_step.LossConfig.from_config(c.loss)
    c = smoke.get_config()
    del c.train["max_bad_steps"]
    with pytest.raises(config_schema.ConfigError, match="train lacks max_bad_steps"):
        train_config.check_config(c)


def test_augmentation_magnitudes_are_overridable_from_the_command_line():
    # The trainers' own flag definition (calcjax.train.loop.define_flags: a locked config file) in a fresh
    # process.
    code = (
        "import sys; from absl import flags; from calcjax.train import loop as train; "
        "from calcjax.data import input_pipeline as ip; "
        "train.define_flags(); flags.FLAGS(sys.argv); "
        "a = ip.AugmentConfig.from_config(flags.FLAGS.config.data); "
        "print(a.rotate_deg, a.noise_sd_hu, a.scale)"
    )
    args = [f"--config={os.path.join(ROOT, 'configs', 'smoke.py')}", "--config.data.rotate_deg=5",
            "--config.data.noise_sd_hu=0", "--workdir=unused"]  # fmt: skip
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["5.0", "0.0", str(default.get_config().data.scale)]


def test_the_trainers_refuse_a_bad_config_before_touching_the_workdir(tmp_path):
    from calcjax.research.torch_baseline import train as torch_train
    from calcjax.train import loop as train

    c = smoke.get_config()
    c.train.stpes = 3
    for trainer in (train.train_and_evaluate, torch_train.train_and_evaluate):
        with pytest.raises(config_schema.ConfigError, match="train.stpes"):
            trainer(c, str(tmp_path / "run"))
        assert not (tmp_path / "run").exists()
