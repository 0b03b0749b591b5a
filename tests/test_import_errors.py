"""Every malformed checkpoint gives one clear message, exit code 2, no traceback and no output file."""

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file, save_file

from bridge import load_checkpoint
from kept_jax import score

WEIGHTS = "model.safetensors"


def _run_score(model_dir, tmp_path, capsys):
    out = tmp_path / "logits.npy"
    rc = score.main(["--model", model_dir, "--tokens", "1,5,9,3", "--save-logits", str(out)])
    captured = capsys.readouterr()
    assert rc == 2
    assert "Traceback" not in captured.err + captured.out
    assert not out.exists()
    assert [p for p in os.listdir(tmp_path) if p.startswith(".tmp-")] == []
    return captured.err


def _edit_config(model_dir, **changes):
    path = os.path.join(model_dir, "config.json")
    with open(path) as f:
        hf = json.load(f)
    hf.update(changes)
    with open(path, "w") as f:
        json.dump(hf, f)


def _edit_tensors(model_dir, edit):
    path = os.path.join(model_dir, WEIGHTS)
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_directory(tmp_path, capsys):
    err = _run_score(str(tmp_path / "nowhere"), tmp_path, capsys)
    assert "does not exist" in err


def test_missing_config(orion_copy, tmp_path, capsys):
    os.remove(os.path.join(orion_copy, "config.json"))
    assert "has no config.json" in _run_score(orion_copy, tmp_path, capsys)


def test_config_not_json(orion_copy, tmp_path, capsys):
    with open(os.path.join(orion_copy, "config.json"), "w") as f:
        f.write("{not json")
    assert "config.json is not valid JSON" in _run_score(orion_copy, tmp_path, capsys)


def test_misspelt_config_attribute_is_rejected(orion_copy, tmp_path, capsys):
    _edit_config(orion_copy, rms_norm_epsilon=1e-6)
    assert "'rms_norm_epsilon' (did you mean 'rms_norm_eps'?)" in _run_score(orion_copy, tmp_path, capsys)


def test_unsupported_rope_type(orion_copy, tmp_path, capsys):
    _edit_config(orion_copy, rope_parameters={"rope_type": "yarn", "factor": 4.0, "rope_theta": 10000.0})
    assert "unsupported rope type 'yarn'" in _run_score(orion_copy, tmp_path, capsys)


def test_no_weights(orion_copy, tmp_path, capsys):
    os.remove(os.path.join(orion_copy, WEIGHTS))
    assert "no weights in" in _run_score(orion_copy, tmp_path, capsys)


def test_missing_tensor(orion_copy, tmp_path, capsys):
    _edit_tensors(orion_copy, lambda t: t.pop("model.layers.1.post_attention_layernorm.bias"))
    err = _run_score(orion_copy, tmp_path, capsys)
    assert "missing 1 tensor(s)" in err and "model.layers.1.post_attention_layernorm.bias" in err


def test_unexpected_tensor(orion_copy, tmp_path, capsys):
    _edit_tensors(orion_copy, lambda t: t.update({"model.layers.0.self_attn.q_norm.weight": np.ones(16, np.float32)}))
    err = _run_score(orion_copy, tmp_path, capsys)
    assert "does not explain" in err and "q_norm.weight" in err


def test_shape_mismatch(orion_copy, tmp_path, capsys):
    _edit_config(orion_copy, intermediate_size=128)
    err = _run_score(orion_copy, tmp_path, capsys)
    assert "has shape (160, 64), but config.json implies (128, 64)" in err


def test_unsupported_dtype(orion_copy, tmp_path, capsys):
    _edit_tensors(orion_copy, lambda t: t.update({"model.norm.weight": t["model.norm.weight"].astype(np.int32)}))
    assert "'model.norm.weight' in model.safetensors has dtype I32" in _run_score(orion_copy, tmp_path, capsys)


def test_non_finite_values(orion_copy, tmp_path, capsys):
    def poison(t):
        t["model.layers.0.mlp.up_proj.weight"][3, 7] = np.nan
        t["model.layers.0.mlp.up_proj.weight"][4, 1] = np.inf

    _edit_tensors(orion_copy, poison)
    err = _run_score(orion_copy, tmp_path, capsys)
    assert "'model.layers.0.mlp.up_proj.weight'" in err and "2 non-finite values" in err


def test_truncated_safetensors(orion_copy, tmp_path, capsys):
    path = os.path.join(orion_copy, WEIGHTS)
    os.truncate(path, os.path.getsize(path) - 100)
    assert "truncated or corrupt" in _run_score(orion_copy, tmp_path, capsys)


def test_corrupt_safetensors_header(orion_copy, tmp_path, capsys):
    with open(os.path.join(orion_copy, WEIGHTS), "r+b") as f:
        f.write(b"\xff" * 16)
    assert "truncated or corrupt" in _run_score(orion_copy, tmp_path, capsys)


def _shard(model_dir):
    """Splits model.safetensors into two shards with an index, as save_pretrained does past max_shard_size."""
    tensors = load_file(os.path.join(model_dir, WEIGHTS))
    os.remove(os.path.join(model_dir, WEIGHTS))
    names = sorted(tensors)
    files = {"model-00001-of-00002.safetensors": names[::2], "model-00002-of-00002.safetensors": names[1::2]}
    weight_map = {}
    for file_name, part in files.items():
        save_file({n: tensors[n] for n in part}, os.path.join(model_dir, file_name), metadata={"format": "pt"})
        weight_map.update({n: file_name for n in part})
    with open(os.path.join(model_dir, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return weight_map


def test_sharded_index_missing_shard(orion_copy, tmp_path, capsys):
    _shard(orion_copy)
    os.remove(os.path.join(orion_copy, "model-00002-of-00002.safetensors"))
    err = _run_score(orion_copy, tmp_path, capsys)
    assert "lists shard 'model-00002-of-00002.safetensors', which is not in" in err


def test_sharded_index_names_tensor_not_in_shard(orion_copy, tmp_path, capsys):
    weight_map = _shard(orion_copy)
    name = next(n for n, f in weight_map.items() if f.startswith("model-00001"))
    weight_map[name] = "model-00002-of-00002.safetensors"
    with open(os.path.join(orion_copy, "model.safetensors.index.json"), "w") as f:
        json.dump({"weight_map": weight_map}, f)
    assert f"says {name!r} is in model-00002-of-00002.safetensors" in _run_score(orion_copy, tmp_path, capsys)


def _to_bin(model_dir):
    tensors = load_file(os.path.join(model_dir, WEIGHTS))
    os.remove(os.path.join(model_dir, WEIGHTS))
    path = os.path.join(model_dir, "pytorch_model.bin")
    torch.save({k: torch.from_numpy(v.copy()) for k, v in tensors.items()}, path)
    return path


def test_truncated_bin(orion_copy, tmp_path, capsys):
    path = _to_bin(orion_copy)
    os.truncate(path, os.path.getsize(path) // 2)
    assert "truncated or corrupt" in _run_score(orion_copy, tmp_path, capsys)


class NotATensor:  # pickled by reference: loading it would import and run this module's code
    pass


def test_bin_with_code_is_refused(orion_copy, tmp_path, capsys):
    path = _to_bin(orion_copy)
    state = torch.load(path, weights_only=True)
    state["payload"] = NotATensor()
    torch.save(state, path)
    message = _run_score(orion_copy, tmp_path, capsys)
    assert "weights_only=True" in message and "NotATensor object" in message
    # torch's advice to load with weights_only=False (which would run the file's code) is never passed on.
    assert "weights_only=False" not in message and "set to `False`" not in message and "\x1b[" not in message


@pytest.mark.parametrize("zip_format", [True, False])
def test_bin_loads_without_torch_warnings(orion_copy, capfd, zip_format):
    path = _to_bin(orion_copy)
    state = torch.load(path, weights_only=True)
    torch.save(state, path, _use_new_zipfile_serialization=zip_format)
    capfd.readouterr()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        load_checkpoint(orion_copy)
    assert [str(w.message) for w in caught] == [] and capfd.readouterr().err == ""


def test_all_formats_load_the_same_params(orion_checkpoint, orion_copy):
    """model.safetensors, sharded safetensors with an index, and pytorch_model.bin give identical parameters."""
    _, reference, _ = load_checkpoint(orion_checkpoint[0])
    _shard(orion_copy)
    _, sharded, _ = load_checkpoint(orion_copy)
    tensors = {}
    for file_name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"):
        tensors.update(load_file(os.path.join(orion_copy, file_name)))
        os.remove(os.path.join(orion_copy, file_name))
    os.remove(os.path.join(orion_copy, "model.safetensors.index.json"))
    torch.save({k: torch.from_numpy(v) for k, v in tensors.items()}, os.path.join(orion_copy, "pytorch_model.bin"))
    _, from_bin, report = load_checkpoint(orion_copy)
    assert report.files == ["pytorch_model.bin"]
    for other in (sharded, from_bin):
        assert all(
            np.array_equal(a, b) for a, b in zip(jax_leaves(reference), jax_leaves(other), strict=True)
        )


def jax_leaves(tree):
    import jax

    return [np.asarray(x) for x in jax.tree.leaves(tree)]


def test_bf16_bin_and_rotary_buffers_are_read_and_listed(orion_copy):
    """bf16 .bin weights load (bit-exact upcast); rotary_emb.inv_freq buffers are skipped and reported."""
    tensors = load_file(os.path.join(orion_copy, WEIGHTS))
    os.remove(os.path.join(orion_copy, WEIGHTS))
    state = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in tensors.items()}
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    torch.save(state, os.path.join(orion_copy, "pytorch_model.bin"))
    config, params, report = load_checkpoint(orion_copy)
    assert report.skipped == [("model.layers.0.self_attn.rotary_emb.inv_freq", "rotary buffer, recomputed from the config")]
    assert report.source_dtypes == {"bfloat16": len(tensors)}
    expected = state["model.norm.bias"].float().numpy()
    np.testing.assert_array_equal(np.asarray(params["model"]["norm"]["bias"]), expected)


def test_cli_error_has_no_traceback(orion_copy, tmp_path):
    path = os.path.join(orion_copy, WEIGHTS)
    os.truncate(path, 1000)
    out = tmp_path / "logits.npy"
    proc = subprocess.run(
        [sys.executable, "-m", "kept_jax.score", "--model", orion_copy, "--tokens", "1,2,3", "--save-logits", str(out)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "truncated or corrupt" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert not out.exists()
