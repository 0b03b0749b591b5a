"""The benchmark scripts run, and their checks can fail: kept_jax's XKD step against the PyTorch step on the same
weights (loss and gradient norm), and the conversion I/O phases on a small synthetic checkpoint."""

import os

import jax
import numpy as np
import pytest

from benchmarks import convert_io, xkd_step
from kept_jax.errors import KeptError

TINY_LLAMBA = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "models",
                           "tiny-llamba.json")
TINY = ["--size", "tiny", "--seq-len", "32", "--batch", "2", "--reps", "1", "--no-save"]


@pytest.mark.parametrize("trainable", ["all", "norms"])
def test_xkd_step_matches_torch_and_reports_a_ratio(trainable, capsys):
    result = xkd_step.run(xkd_step.parse_args(TINY + ["--trainable", trainable, "--vs", "torch"]))
    check = result["check"]
    for key in ("loss", "grad_norm"):
        assert check["kept_jax"][key] == pytest.approx(check["torch"][key], rel=1e-4)
    assert check["kept_jax"]["loss"] > 0
    assert result["ratio"] == pytest.approx(result["kept_jax"]["tokens_per_s"] / result["torch"]["tokens_per_s"], rel=1e-2)
    assert result["kept_jax"]["step_flops"] == result["torch"]["step_flops"] > 0


def test_the_same_step_check_fails_when_the_steps_differ():
    args = xkd_step.parse_args(TINY)
    config = xkd_step.teacher_config(args)
    teacher, student = xkd_step.random_weights(config)
    tokens = xkd_step.random_tokens(config, 2, 32)
    other_student = jax.tree.map(lambda x: x * 1.01, student)  # the PyTorch student gets other weights
    reference = xkd_step.TorchStep(config, "all", teacher, other_student, tokens, "float32")
    kept = xkd_step.KeptStep.build(config, xkd_step.student_variables(student, "all"), teacher,
                                   np.asarray(tokens)[None], "all", 1024)
    kept.init()
    with pytest.raises(KeptError, match="disagree"):
        xkd_step.check_same_step(kept, reference)


def test_xkd_step_lora_and_compile_only(capsys):
    result = xkd_step.run(xkd_step.parse_args(TINY + ["--trainable", "lora"]))
    assert result["kept_jax"]["tokens_per_s"] > 0 and "torch" not in result
    result = xkd_step.run(xkd_step.parse_args(TINY + ["--trainable", "lora", "--compile-only"]))
    memory = result["compile"]["memory_GiB"]
    assert memory["argument"] > 0 and memory["total"] >= memory["temp"]


def test_xkd_step_refuses_lora_against_torch():
    with pytest.raises(SystemExit):
        xkd_step.parse_args(TINY + ["--trainable", "lora", "--vs", "torch"])


def test_convert_io_phases(tmp_path, capsys):
    # A narrow layout: this checks the benchmark's machinery; its figures come from the 2 GB run in docs/.
    result = convert_io.run(8_000_000, 2, str(tmp_path), hidden=256, vocab=2048)
    assert result["layers"] >= 2 and result["shards"] >= 2
    assert set(result["phases"]) == {"calibrate", "export"} and "--no-eval" in result["command"]
    assert all(p["seconds"] > 0 and p["peak_rss_MB"] > 0 for p in result["phases"].values())
    assert result["peak_rss_MB"] >= max(p["peak_rss_MB"] for p in result["phases"].values())
    assert result["target_MB"] == pytest.approx(1.25 * result["checkpoint_MB"] + 300, abs=0.2)
    exported = sorted(p.name for p in (tmp_path / "llama").iterdir())
    assert "model.safetensors.index.json" in exported and "config.json" in exported


def test_mixer_benchmark_times_every_form_and_skips_past_its_memory_budget(capsys):
    from benchmarks import mixer

    def rows(argv):
        # The tiny Llamba's mixer: this checks the machinery; the figures come from the 1B width in docs/.
        mixer.main(argv + ["--lengths", "40", "--reps", "1", "--no-save", "--config", TINY_LLAMBA])
        lines = capsys.readouterr().out.splitlines()
        return [line.split() for line in lines if line.split() and line.split()[0] in ("chunked", "matrix", "recurrent")]

    timed = rows([])
    assert [r[0] for r in timed] == ["chunked", "matrix", "recurrent"]
    assert all(float(r[2]) > 0 and float(r[3]) > 0 and float(r[4]) > 0 for r in timed)
    assert all(r[2] == r[3] == "-" for r in rows(["--memory-budget", "16KiB"]))


@pytest.mark.slow  # about a minute: three compiled steps at the 1B width
def test_mohawk_step_benchmark_runs_every_stage(capsys):
    """The stage steps the job runs, at Llama-3.2-1B / Llamba-1B width (one layer, a small vocabulary)."""
    import json

    from benchmarks import mohawk_step

    assert mohawk_step.main(["--layers", "1", "--seq", "32", "--batch", "1", "--reps", "1", "--vocab", "512",
                             "--no-save"]) == 0
    rows = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert [r["stage"] for r in rows] == ["matrix", "hidden", "kd"]
    assert all(r["tokens_per_s"] > 0 and r["flops_per_token"] > 0 and r["temp_bytes"] > 0 for r in rows)
    # Each stage trains more than the one before it: mixers, then whole blocks, then everything.
    assert rows[0]["trainable_params"] < rows[1]["trainable_params"] < rows[2]["trainable_params"]
    assert rows[0]["flops_per_token"] < rows[1]["flops_per_token"] < rows[2]["flops_per_token"]


@pytest.mark.slow
@pytest.mark.parametrize("shapes", ["1b", "smollm2-135m"])
def test_generate_benchmark_runs_and_its_memory_follows_the_state(shapes):
    """One layer of each shape at short contexts: every point is measured (batch 1 streamed too), Llama's state
    grows with the context and Llamba's and a pure Mamba-2 hybrid's do not, and the largest-batch figure is
    confirmed by its own compilation."""
    from benchmarks import generate

    result = generate.run(generate.parse_args(
        ["--shapes", shapes, "--layers", "1", "--contexts", "256,512", "--batches", "1,2", "--batch-context", "256",
         "--steps", "4", "--reps", "1", "--hf-max-context", "256", "--hf-max-batch", "1", "--fit-memory", "10GiB",
         "--fit-contexts", "256", "--hybrids", "none", "--no-save"]))
    models = ("llama", "llamba", "hybrid none")
    assert {(r["model"], r["context"]) for r in result["points"] if r["impl"] == "kept_jax streamed"} == {
        (model, context) for model in models for context in (256, 512)}
    state = {(r["model"], r["impl"], r["context"]): r["state_GiB"] for r in result["points"]
             if r["batch"] == 1 and "state_GiB" in r}
    assert state[("llama", "kept_jax", 512)] > 1.9 * state[("llama", "kept_jax", 256)]
    for recurrent in models[1:]:  # a Llamba and a hybrid without attention keep a state of fixed size
        assert state[(recurrent, "kept_jax", 512)] == state[(recurrent, "kept_jax", 256)]
    assert all(r["tokens_per_s"] > 0 for r in result["points"])
    for fit in result["largest_batch"]:
        assert fit["largest_batch"] > 0 and fit["compiled_GiB_at_largest"] <= fit["budget_GiB"]


@pytest.mark.slow
def test_generate_benchmark_measures_each_precision_side_by_side():
    """SmolLM2's shape, one layer: bf16 holds half of fp32's weight bytes, int8 fewer than fp32 and int4 fewer than
    int8 (with one layer the fp32 tied embedding, which is not quantized, dominates all three), and every precision's
    decode loop is compiled, sized and timed."""
    from benchmarks import generate

    result = generate.run(generate.parse_args(
        ["--shapes", "smollm2-135m", "--layers", "1", "--contexts", "256", "--batches", "1", "--batch-context",
         "256", "--steps", "4", "--reps", "1", "--hf-max-context", "0", "--hf-max-batch", "0", "--fit-memory", "",
         "--precisions", "fp32,bf16,int8,int4", "--no-save"]))
    for model in ("llama", "llamba"):
        rows = {r["precision"]: r for r in result["points"]
                if r["model"] == model and r["impl"] == "kept_jax" and r["sweep"] == "context"}
        weights = {p: rows[p]["weight_MiB"] for p in generate.PRECISIONS}
        assert weights["bf16"] == pytest.approx(weights["fp32"] / 2, rel=1e-6)
        assert weights["int4"] < weights["int8"] < weights["fp32"]
        assert all(rows[p]["peak_GiB"] > 0 and rows[p]["tokens_per_s"] > 0 for p in rows)


def test_on_device_projection_keeps_llambas_state_and_grows_llamas_cache():
    """Llamba's state does not depend on the context and Llama's KV cache doubles with it; every published size is
    exportable and quantizing the head makes its weights smaller."""
    from benchmarks import on_device

    short, long = (on_device.run(on_device.parse_args(["--context", str(c), "--no-save"]))["rows"]
                   for c in (16384, 32768))
    for a, b in zip(short, long):
        assert a["llamba_state_GB"] == b["llamba_state_GB"] > 0
        assert b["llama_kv_bf16_GB"] == pytest.approx(2 * a["llama_kv_bf16_GB"])
        assert b["llamba_weights_head_quantized_GB"] < b["llamba_weights_GB"] < b["llama_weights_bf16_GB"]


def test_quality_benchmark_scores_each_precision_against_fp32(tmp_path):
    """A tiny Llama with a tokenizer: fp32 against itself costs nothing; bf16, int8 and int4 cost something, int4
    the most."""
    from benchmarks import quality
    from tests import fixtures as fx

    model = fx.make_llama(fx.base_config("tiny-llama"), seed=2)
    path = fx.save_llama(model, str(tmp_path / "llama"))
    fx.add_byte_level_tokenizer(path, model.config.vocab_size)
    result = quality.run(quality.parse_args(["--model", path, "--tokens", "1024", "--seq-len", "128",
                                             "--group-size", "32", "--no-save"]))
    kl = {r["precision"]: r["kl"] for r in result[path]["points"]}
    assert abs(kl["fp32"]) < 1e-6
    assert 0 < kl["bf16"] and 0 < kl["int8"] < kl["int4"]


def test_students_benchmark_pairs_each_evenly_spaced_hybrid_with_a_measured_one():
    """Each share of attention comes evenly spaced and as the same number of layers chosen by their leave-one-out
    KL (the costliest); without the costs only the evenly spaced ones; the Llamba and a pure Mamba-2 always."""
    from benchmarks.students import variants

    costs = list(np.random.default_rng(0).random(12))
    with_costs = variants(12, costs)
    assert with_costs["Llamba"] == ("llamba", [])
    assert with_costs["Mamba-2 (no attention)"] == ("hybrid", ["attention_layers=none"])
    for every in (8, 4, 2):
        n = len(range(0, 12, every))
        named = {name.split("(")[-1].rstrip(")"): overrides for name, (_, overrides) in with_costs.items()}
        assert named[f"every:{every}"] == [f"attention_layers=every:{every}"]
        (chosen,) = named[f"auto:{n}"]
        layers = [int(i) for i in chosen.removeprefix("attention_layers=[").removesuffix("]").split(",")]
        assert len(layers) == n and min(costs[i] for i in layers) >= max(np.delete(costs, layers))
    assert not any("auto" in name for name in variants(12, None))
