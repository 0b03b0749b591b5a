"""`--dry-run`: the 14B jobs planned from shapes alone, with counts checked against Orion-14B's published layout."""

import pytest

from kept_jax import train
from kept_jax.dry_run import estimate
from kept_jax.memory import GIB, parse_size
from kept_jax.errors import KeptError
from kept_jax.train_config import load_config

# Orion-14B (configs/models/orion-14b.json): 40 layers, d 5120, ffn 15360, 40 heads x 128 (MHA), vocab 84608,
# untied, LayerNorm with bias.
def plan(cfg, devices=None):
    """The dry run's plan and estimates of job `cfg` (the job's own planning, from the layout alone)."""
    job_plan = train.plan_job(cfg, devices or cfg.mesh.devices(), dry_run=True)
    return {**estimate(job_plan), "plan": job_plan}


L, D, F, V = 40, 5120, 15360, 84608
ORION_PARAMS = L * (4 * D * D + 3 * D * F + 2 * 2 * D) + 2 * V * D + 2 * D


@pytest.mark.parametrize("name", ["orion-14b-base", "orion-14b-chat", "orion-14b-longchat"])
def test_14b_configs_plan_and_fit_one_80gb_gpu(name, capsys):
    cfg, _ = load_config(f"configs/{name}.yaml")
    p = plan(cfg)
    assert p["teacher_params"] == ORION_PARAMS
    assert p["student_params"] == ORION_PARAMS - L * 2 * D - D  # Llama norms have no bias
    lora = cfg.lora.rank * L * (4 * 2 * D + 2 * (D + F) + (F + D))  # q,k,v,o; gate, up; down
    assert p["trainable_params"] == lora
    memory = p["memory"]
    assert memory["teacher weights (bfloat16)"] == 2 * ORION_PARAMS
    # absorb edits q, k, v, gate, up and lm_head: the student keeps its own copy of those (and its three gains).
    own = 2 * (L * (3 * D * D + 2 * D * F) + D * V + 2 * L * D + D)
    assert memory["student weights not shared with the teacher (9 leaves)"] == own
    assert memory["optimizer state (AdamW m and v, fp32)"] == 8 * lora
    assert train.main(["--config", f"configs/{name}.yaml", "--dry-run", "--device-memory", "80GB"]) == 0
    out = capsys.readouterr().out
    assert "every tensor covered" in out and ": fits (" in out and f"{p['total'] / GIB:.2f}" in out
    assert train.main(["--config", f"configs/{name}.yaml", "--dry-run", "--device-memory", "40GB"]) == 1
    assert "does NOT fit" in capsys.readouterr().out


def test_shardings_divide_memory_and_are_checked():
    one, _ = load_config("configs/orion-14b-base.yaml")
    eight, _ = load_config("configs/orion-14b-base.yaml", ["mesh.fsdp=8"])
    p1, p8 = plan(one), plan(eight, devices=8)
    assert p8["plan"].mesh == {"data": 1, "fsdp": 8, "tensor": 1} and p8["plan"].micro_batch == 1
    assert p8["memory"]["teacher weights (bfloat16)"] < p1["memory"]["teacher weights (bfloat16)"] / 7.9
    bad, _ = load_config("configs/orion-14b-base.yaml", ["mesh.tensor=3", "data.batch_size=9"])
    with pytest.raises(KeptError, match="does not split 3 ways over mesh axes"):
        plan(bad, devices=3)
    with pytest.raises(KeptError, match="does not split over data x fsdp = 3"):
        plan(load_config("configs/orion-14b-base.yaml", ["mesh.fsdp=3"])[0], devices=3)


def test_dry_run_needs_a_layout(tmp_path, capsys):
    assert train.main(["--config", "configs/orion-14b-base.yaml", "--dry-run", "source_config=",
                       f"source={tmp_path}"]) == 2
    assert "no source_config set" in capsys.readouterr().err


def test_one_size_parser_for_every_flag():
    """--device-memory and --max-shard-size read sizes alike: GB decimal (as GPU data sheets and Transformers'
    max_shard_size), GiB binary."""
    assert parse_size("80GB", "--device-memory") == 80 * 10**9 and parse_size("80GiB", "--device-memory") == 80 * GIB
    assert parse_size("141 gb", "--x") == 141 * 10**9 and parse_size("1024", "--x") == 1024
    assert parse_size("5GB", "--max-shard-size") == 5 * 10**9 and parse_size("500MiB", "--x") == 500 * 2**20
    assert parse_size(".5G", "--x") == 5 * 10**8
    for bad in ("eighty", "80 GBs", "5XB", ""):
        with pytest.raises(KeptError, match=r"--device-memory '.*' is not a size: give one such as 80GB"):
            parse_size(bad, "--device-memory")


# Llama-3.2-1B (configs/models/llama-3.2-1b-instruct.json): 16 layers, d 2048, ffn 8192, 32 heads x 64 (8 KV),
# vocab 128256, tied.
def test_llamba_configs_plan_every_stage_on_1_and_8_devices(capsys):
    cfg, _ = load_config("configs/llamba-1b.yaml")
    p = plan(cfg)
    assert [s["name"] for s in p["stages"]] == ["matrix", "hidden", "kd"]
    step = 64 * 2048  # whole steps of 64 sequences of 2048 tokens, at least the paper's budget
    assert [s["tokens"] for s in p["stages"]] == [-(-t // step) * step for t in (300e6, 2.7e9, 5e9)]
    layers, d, f, h, n = 16, 2048, 8192, 32, 64
    mixer = d * (2 * d + 2 * h * n + h) + d * d + d + (d + 2 * h * n) * 5 + h  # in/out_proj, z_bias, conv, D
    matrix, hidden, kd = p["stages"]
    assert matrix["trainable_params"] == layers * mixer  # the mixers alone
    assert hidden["trainable_params"] == layers * (mixer + 3 * d * f + 2 * d)
    assert kd["trainable_params"] == p["student_params"]
    # Stage 1 holds one layer's [b, H, T, T] matrices at a time: 5 of them, b = 8 sequences, fp32.
    assert matrix["memory"]["one layer's matrices (5 x b H T^2 fp32, H = 32)"] == 5 * 8 * h * 2048 ** 2 * 4
    # The norms, the MLPs, the embedding and the final norm read the teacher's buffers until trained.
    assert matrix["shared_leaves"] == 7 and kd["shared_leaves"] == 0
    assert train.main(["--config", "configs/llamba-8b.yaml", "--dry-run", "--device-memory", "80GB"]) == 1
    assert "NOT every stage fits" in capsys.readouterr().out
    assert train.main(["--config", "configs/llamba-8b.yaml", "--dry-run", "--device-memory", "80GB", "--devices", "8",
                       "mesh.fsdp=8"]) == 0
    out = capsys.readouterr().out
    assert "every stage fits" in out and out.count("stage ") >= 3
    assert "1,908 steps, 0.50B tokens" in out  # the paper's budgets in billions
    assert train.main(["--config", "configs/llamba-3b.yaml", "--dry-run"]) == 0
    assert train.main(["--config", "configs/tiny-llamba.yaml", "--dry-run"]) == 0
    assert "40 steps, 40,960 tokens" in capsys.readouterr().out  # a small budget in tokens, not "0.00B"


def test_llamba_dry_run_refuses_what_the_job_refuses():
    """The published Llamba-3B (32 mixer heads) cannot be paired with Llama-3.2-3B's 24 attention heads in stage 1;
    the dry run builds the student where the job does, so it says so too."""
    cfg, _ = load_config("configs/llamba-3b.yaml", ["student_config=configs/models/llamba-3b.json"])
    with pytest.raises(KeptError, match="compares each mixer head with an attention head"):
        plan(cfg)


def test_a_layout_path_that_names_no_config_is_one_message(capsys):
    for key in ("source_config", "student_config"):
        assert train.main(["--config", "configs/llamba-1b.yaml", "--dry-run", f"{key}=nope.json"]) == 2
        assert f"{key} 'nope.json' is neither a config.json nor a directory holding one" in capsys.readouterr().err
