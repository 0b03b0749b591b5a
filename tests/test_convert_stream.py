"""The conversion streams: the teacher is calibrated one layer at a time straight from its files, each rule runs in
float64 blocks, and `convert --no-eval` computes each tensor only as the writer asks for it. Each must give what the
whole-model, whole-tensor computation gives."""

import gc
import json
import os
import weakref

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bridge.checkpoint import load_checkpoint
from bridge.hf_import import CheckpointReader, params_from_reader, streamed_layers
from kept_jax import convert
from kept_jax.config import NUMPY_DTYPES
from kept_jax.mapping import build_mapping, calibrate, outer_sites, rules
from kept_jax.mapping.opm import STRATEGIES, absorb_direction, solved
from kept_jax.models import build_model


@pytest.fixture(scope="module")
def orion_fp32(orion_checkpoint):
    path, _ = orion_checkpoint
    config, params, _ = load_checkpoint(path, compute_dtype="float32", param_dtype="float32")
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, size=(3, 24)).astype(np.int32)
    return path, config, params, tokens


def _reference_sums(config, params, tokens) -> dict[str, dict[str, np.ndarray]]:
    """From the whole model's norm inputs (one forward pass, every layer at once), summed in float64 with NumPy."""
    inputs, _ = build_model(config).apply({"params": params}, jnp.asarray(tokens), method="norm_inputs",
                                          mutable="intermediates")
    eps, out = config.rms_norm_eps, {}
    for site, x in inputs.items():
        x = np.asarray(x, np.float64).reshape(-1, x.shape[-1])
        u = x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)
        c = x - x.mean(-1, keepdims=True)
        a = c / np.sqrt((c * c).mean(-1, keepdims=True) + eps)
        out[site] = {"u": u.sum(0), "uu": (u * u).sum(0), "a": a.sum(0), "aa": (a * a).sum(0),
                     "au": (a * u).sum(0), "aa_outer": a.T @ a}
    return out


def test_layer_by_layer_calibration_from_the_files_matches_the_whole_model(orion_fp32):
    path, config, params, tokens = orion_fp32
    reader = CheckpointReader(path)
    unscanned = config.replace(scan_layers=False)
    embedding, _, _ = params_from_reader(reader, unscanned, lambda spec: spec.hf_name == config.hf_embedding_name)
    assert set(embedding) == {"model"} and set(embedding["model"]) == {"embed_tokens"}  # nothing else was read

    alive = []  # each layer read from the files must be gone before the next is read

    def layers():
        for layer in streamed_layers(reader, config):
            gc.collect()
            assert sum(ref() is not None for ref in alive) == 0, f"layer {len(alive) - 1} is alive at the next"
            alive.append(weakref.ref(jax.tree.leaves(layer)[0]))
            yield layer
            del layer

    sites = outer_sites("absorb", config)
    stats = calibrate(unscanned, embedding, layers(), [tokens[:2], tokens[2:]], outer_sites=sites)
    assert len(alive) == config.num_hidden_layers
    reference = _reference_sums(config, params, tokens)
    assert set(stats) == set(reference)
    for site, sums in reference.items():
        assert stats[site].n == tokens.size
        for key, value in sums.items():
            np.testing.assert_allclose(getattr(stats[site], key), value, rtol=2e-4, atol=2e-3, err_msg=f"{site} {key}")


def test_a_solved_site_keeps_the_absorb_direction_and_error(orion_fp32):
    _, config, params, tokens = orion_fp32
    from kept_jax.models import layer_list

    stats = calibrate(config, params, layer_list(params), [tokens], outer_sites=outer_sites("absorb", config))
    full = build_mapping("absorb", config, stats)
    compact = {site: solved(st, 1e-6) for site, st in stats.items()}
    assert all(st.aa_outer is None and st.absorb[1].shape == (config.hidden_size,) for st in compact.values())
    small = build_mapping("absorb", config, compact)
    read = CheckpointReader(orion_fp32[0]).read
    for (name, a, err_a), (_, b, err_b) in zip(full.materialize(read, np.float32), small.materialize(read, np.float32)):
        np.testing.assert_array_equal(a, b, err_msg=name)
        assert err_a == pytest.approx(err_b, rel=1e-12, abs=1e-15), name
    with pytest.raises(ValueError, match="second moment"):  # another ridge needs the moment it no longer has
        absorb_direction(solved(stats["model.norm"], 1e-6), 1e-3)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_rules_in_blocks_give_the_whole_tensor_result(orion_fp32, strategy, monkeypatch):
    _, config, params, tokens = orion_fp32
    from kept_jax.models import layer_list

    stats = calibrate(config, params, layer_list(params), [tokens], outer_sites=outer_sites(strategy, config))
    mapping = build_mapping(strategy, config, stats)
    read = CheckpointReader(orion_fp32[0]).read
    whole = {name: value for name, value, _ in mapping.materialize(read, np.float64)}
    monkeypatch.setattr(rules, "BLOCK_BYTES", 8 * 40)  # rows of 64 floats: several blocks per tensor
    blocked = dict((name, value) for name, value, _ in mapping.materialize(read, np.float64))
    assert sum(r.block_axis is not None for r in mapping.rules) > len(mapping.rules) // 2
    for name, value in whole.items():
        np.testing.assert_allclose(blocked[name], value, rtol=1e-12, atol=1e-14, err_msg=name)


def test_no_eval_streams_the_same_export(kept_export, tmp_path, capsys):
    out = str(tmp_path / "streamed")
    assert convert.main(["--out", out, "--opm", "absorb", "--calib-tokens", "2048", "--no-eval"]) == 0
    captured = capsys.readouterr()
    assert "calibrate" in captured.err and "export (streamed" in captured.err
    assert "not evaluated (--no-eval)" in captured.out
    evaluated, _ = kept_export
    with open(os.path.join(out, "model.safetensors"), "rb") as a, \
            open(os.path.join(evaluated, "model.safetensors"), "rb") as b:
        assert a.read() == b.read()
    report = json.load(open(os.path.join(out, "conversion_report.json")))
    assert report["evaluation"] is None and report["strategies"]["absorb"]["mapping"][1]["error"] is not None
    assert set(report["timings_s"]) == {"calibrate", "export"}


def test_no_eval_needs_one_choice(tmp_path, capsys):
    assert convert.main(["--out", str(tmp_path / "x"), "--opm", "all", "--no-eval"]) == 2
    assert "--no-eval leaves nothing to compare" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "x")


def test_the_export_dtype_is_the_rules_output_dtype(orion_fp32):
    mapping = build_mapping("copy", orion_fp32[1])
    name, value, _ = next(mapping.materialize(CheckpointReader(orion_fp32[0]).read, NUMPY_DTYPES["bfloat16"]))
    assert value.dtype == NUMPY_DTYPES["bfloat16"] and name == "model.embed_tokens.weight"


def test_convert_output_location_errors_are_one_line_and_leave_nothing(tmp_path, monkeypatch, capsys):
    import errno

    from bridge import hf_export

    (tmp_path / "file").write_text("x")
    assert convert.main(["--out", str(tmp_path / "file" / "out"), "--no-eval"]) == 2
    assert "which is a regular file, not a directory" in capsys.readouterr().err

    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert convert.main(["--out", str(mine), "--no-eval", "--force"]) == 2
    assert "--force replaces only what kept_jax wrote" in capsys.readouterr().err
    assert os.listdir(mine) == ["notes.txt"]

    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(hf_export, "write_safetensors", full)
    assert convert.main(["--out", str(tmp_path / "out"), "--no-eval"]) == 2
    err = capsys.readouterr().err
    assert "error: no space left on the device of" in err and "Traceback" not in err
    assert sorted(os.listdir(tmp_path)) == ["file", "mine"]
