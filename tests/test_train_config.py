"""Job configs: YAML against the typed schema, dotted overrides, and errors that name the closest key."""

import glob
import os

import pytest

from kept_jax.errors import KeptError
from kept_jax.train_config import CONFIG_DIR, JobConfig, load_config


@pytest.mark.parametrize("path", sorted(glob.glob(os.path.join(CONFIG_DIR, "*.yaml"))))
def test_shipped_configs_load(path):
    cfg, raw = load_config(path)
    assert isinstance(cfg, JobConfig) and raw


def test_default_is_tiny_and_overrides_apply():
    cfg, _ = load_config(None, ["train.steps=7", "train.warmup=3", "data.seq_len=256", "data.batch_size=4", "opm=center-lsq",
                                "trainable=norms+biases", "lora.targets=[q_proj,v_proj]", "loss.temperature=2"])
    assert (cfg.train.steps, cfg.data.seq_len, cfg.data.batch_size, cfg.opm) == (7, 256, 4, "center-lsq")
    assert cfg.trainable == "norms+biases" and cfg.lora.targets == ("q_proj", "v_proj")
    assert cfg.loss.temperature == 2.0 and isinstance(cfg.loss.temperature, float)
    assert load_config(None, ["trainable=[mlp/.*, lm_head]"])[0].trainable == ("mlp/.*", "lm_head")
    assert load_config(None, ["train.lr=1e-2"])[0].train.lr == 0.01  # YAML 1.1 reads 1e-2 as a string


@pytest.mark.parametrize(
    "override,message",
    [
        ("train.stpes=3", "unknown config key train.stpes; did you mean train.steps?"),
        ("dta.seq_len=3", "unknown config key dta; did you mean data?"),
        ("opm=absorbb", "opm must be one of copy, lsq, center, center-lsq, absorb, exact; got 'absorbb' (did you mean 'absorb'?)"),
        ("trainable=norm", "did you mean 'norms'?"),
        ("train.steps=many", "train.steps must be int, got 'many'"),
        ("train.lr=fast", "train.lr must be float, got 'fast'"),
        ("train.steps=0", "train.steps = 0 is out of range: it must be finite and >= 1"),
        ("train.lr=-1", "train.lr = -1.0 is out of range: it must be finite and > 0"),
        ("train.lr=.nan", "train.lr = nan is out of range"),
        ("train.lr=.inf", "train.lr = inf is out of range"),
        ("train.warmup=300", "train.warmup (300) is longer than train.steps (200)"),
        ("train.clip=0", "train.clip = 0.0 is out of range: it must be finite and > 0"),
        ("loss.temperature=0", "loss.temperature = 0.0 is out of range"),
        ("loss.ce=-0.5", "loss.ce = -0.5 is out of range: it must be finite and >= 0"),
        ("data.eval_fraction=1.5", "data.eval_fraction = 1.5 is out of range: it must be finite and > 0 and <= 1"),
        ("lora.alpha=-2", "lora.alpha = -2.0 is out of range"),
        ("data.seq_len=1", "data.seq_len = 1 is out of range: it must be finite and >= 2"),
        ("data.train=[{path: a.jsonl, weight: 0}]", "data.train[0].weight = 0.0 is out of range"),
        ("precision.compute=fp16", "precision.compute must be one of float32, bfloat16"),
        ("lora.targets=[q_proj,qkv]", "lora.targets has 'qkv'"),
        ("loss.forward_kl=0", "every loss weight is zero"),
        ("steps", "must look like key=value"),
        ("train=3", "train must be a mapping"),
    ],
)
def test_errors_name_the_problem(override, message):
    with pytest.raises(KeptError) as info:
        load_config(None, [override])
    assert message in str(info.value)


def test_missing_and_malformed_files(tmp_path):
    with pytest.raises(KeptError, match="does not exist"):
        load_config(str(tmp_path / "none.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("train: [unclosed\n")
    with pytest.raises(KeptError, match="not valid YAML"):
        load_config(str(bad))


def test_every_numeric_key_has_a_range():
    """A numeric field added to any config section without a RANGES entry fails here (check_ranges would raise
    KeyError on it)."""
    from kept_jax.train_config import RANGES, numeric_fields

    kept, _ = load_config(None, ["data.train=[{path: a.jsonl}]", "data.eval=[{path: b.jsonl}]"])
    mohawk, _ = load_config(os.path.join(CONFIG_DIR, "tiny-llamba.yaml"))
    hybrid, _ = load_config(os.path.join(CONFIG_DIR, "tiny-hybrid.yaml"), ["attention_layers=2"])  # one layer: a number
    keys = {key for cfg in (kept, mohawk, hybrid) for key, _, _ in numeric_fields(cfg)}
    assert keys == set(RANGES)
