"""Sharding: the XKD step on 8 simulated CPU devices, in data, fsdp, tensor and mixed layouts, matches one device.

The layouts run in one subprocess, one after another (the device count is fixed when JAX starts, and starting JAX
once for all four saves three starts); the one-device reference runs here.
"""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from kept_jax import sharding
from kept_jax.errors import KeptError
from tests import sharded_run

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAYOUTS = {
    "data": {"data": 8, "fsdp": 1, "tensor": 1},
    "fsdp": {"data": 1, "fsdp": 8, "tensor": 1},
    "tensor": {"data": 1, "fsdp": 1, "tensor": 8},
    # 2 x 2 x 2, with the teacher laid out differently from the student (its weights replicated over fsdp).
    "mixed": {"data": 2, "fsdp": 2, "tensor": 2, "teacher_rules": {"embed": None}},
}


@pytest.fixture(scope="module")
def reference(orion_checkpoint):
    return sharded_run.run(orion_checkpoint[0], {})


@pytest.fixture(scope="module")
def sharded_runs(orion_checkpoint, tmp_path_factory) -> str:
    """The directory where the 8-device process wrote <layout>.npz for every layout."""
    out = str(tmp_path_factory.mktemp("sharded"))
    flags = " ".join(filter(None, [os.environ.get("XLA_FLAGS"), "--xla_force_host_platform_device_count=8"]))
    env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-m", "tests.sharded_run", orion_checkpoint[0], out, json.dumps(LAYOUTS)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=1200)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


@pytest.mark.xdist_group("sharding-8-devices")  # one worker starts the 8-device process (20-30 s) once
@pytest.mark.parametrize("name", LAYOUTS)
def test_layout_matches_one_device(name, reference, sharded_runs):
    sharded = dict(np.load(os.path.join(sharded_runs, f"{name}.npz")))
    assert int(reference["devices"]) == 1 and int(sharded["devices"]) == 8
    for key, value in reference.items():
        if key.startswith("metric/"):
            np.testing.assert_allclose(sharded[key], value, rtol=2e-5, atol=1e-7, err_msg=key)
        elif key.startswith("update/"):
            # What 3 AdamW steps changed. Reductions run in another order on 8 devices, and Adam divides by
            # sqrt(v), which magnifies that fp32 noise where a gradient is near zero: compare as a whole.
            diff = np.linalg.norm(sharded[key] - value) / np.linalg.norm(value)
            assert diff < 1e-3, (key, diff)
    q_shard = tuple(sharded["shard/params/model/layers/self_attn/q_proj/kernel"])
    full = tuple(reference["shard/params/model/layers/self_attn/q_proj/kernel"])  # [layers, embed, q_heads]
    expected = {"data": full, "fsdp": (full[0], full[1] // 8, full[2]), "tensor": (full[0], full[1], full[2] // 8),
                "mixed": (full[0], full[1] // 2, full[2] // 2)}[name]
    assert q_shard == expected
    teacher_expected = (full[0], full[1], full[2] // 2) if name == "mixed" else expected
    assert tuple(sharded["teacher_shard/q_proj"]) == teacher_expected


@pytest.mark.xdist_group("sharding-8-devices")
def test_a_hybrids_gradients_on_the_mixed_mesh_match_one_device(sharded_runs):
    """The GraniteMoeHybrid's own logical axes (its Mamba-2 inner dimension over tensor, the gated norm's weight
    with it) place it on the 2 x 2 x 2 mesh, and its loss and gradients are one device's."""
    sharded = dict(np.load(os.path.join(sharded_runs, "hybrid.npz")))
    reference = sharded_run.hybrid_gradients(None)
    assert tuple(sharded["shard/out_proj"]) == tuple(s // 2 for s in reference["shard/out_proj"])  # [inner, embed]
    np.testing.assert_allclose(sharded["loss"], reference["loss"], rtol=1e-5)
    for key, value in reference.items():
        if key.startswith("grad"):  # reductions in another order: fp32 noise, compared as a whole (7e-5 measured)
            assert np.linalg.norm(sharded[key] - value) <= 1e-3 * np.linalg.norm(value), key


def test_mesh_and_rule_errors():
    assert sharding.mesh_shape(-1, 2, 2, 8) == (2, 2, 2)
    with pytest.raises(KeptError, match="4 are visible"):
        sharding.mesh_shape(2, 2, 2, 4)
    with pytest.raises(KeptError, match="at most one -1"):
        sharding.mesh_shape(-1, -1, 1, 8)
    with pytest.raises(KeptError, match="unknown logical axis 'embd'"):
        sharding.rules_from({"embd": "fsdp"})
    with pytest.raises(KeptError, match="names 'model'; mesh axes: data, fsdp, tensor"):
        sharding.rules_from({"embed": "model"})
    assert dict(sharding.rules_from({"mlp": ["fsdp", "tensor"], "vocab": None}))["mlp"] == ("fsdp", "tensor")


def test_a_hand_launch_passes_its_process_count_and_index():
    """jax.distributed.initialize reads JAX_COORDINATOR_ADDRESS but not these two; kept_jax hands them over."""
    assert sharding.distributed_arguments({}) == {}
    assert sharding.distributed_arguments({"JAX_NUM_PROCESSES": "2", "JAX_PROCESS_ID": "1"}) == {
        "num_processes": 2, "process_id": 1}
    with pytest.raises(KeptError, match="JAX_PROCESS_ID='first': give a whole number"):
        sharding.distributed_arguments({"JAX_PROCESS_ID": "first"})


def test_distributed_launch_is_detected_from_the_launcher():
    assert not sharding.launched_distributed({})
    assert not sharding.launched_distributed({"SLURM_NTASKS": "1"})
    assert sharding.launched_distributed({"SLURM_NTASKS": "16"})
    assert sharding.launched_distributed({"OMPI_COMM_WORLD_SIZE": "2"})
    assert sharding.launched_distributed({"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
