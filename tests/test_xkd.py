"""The XKD engine: trainable sets, LoRA, shared buffers, the step's invariants (frozen teacher, determinism,
gradient accumulation, optimizer state only for what trains)."""


import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kept_jax.train import Job, plan_job
from kept_jax.train_config import load_config
from kept_jax.xkd.objectives import LogitKL
from kept_jax.xkd.step import init_state, make_optimizer, make_train_step
from kept_jax.xkd.trainable import merge_lora

SMALL = ["data.seq_len=32", "data.batch_size=4", "data.calib_tokens=512", "data.eval_tokens=256"]


def _job(source, *overrides):
    cfg, _ = load_config(None, [f"source={source}", *SMALL, *overrides])
    job = Job(plan_job(cfg, jax.device_count()))
    job.prepare()
    return job


@pytest.fixture(scope="module")
def job_exact_norms(orion_checkpoint):
    return _job(orion_checkpoint[0], "opm=exact", "trainable=norms+biases")


def _flat_keys(job):
    return {"/".join(k) for k in job.split.trainable}


def test_trainable_sets_select_what_they_say(orion_checkpoint, job_exact_norms):
    keys = _flat_keys(job_exact_norms)
    assert keys and all(k.endswith("layernorm/weight") or k.endswith("norm/weight") or k.endswith("/bias") for k in keys)
    assert "params/model/layers/self_attn/q_proj/bias" in keys and "params/model/norm/weight" in keys
    norms = _flat_keys(_job(orion_checkpoint[0], "opm=exact", "trainable=norms"))
    assert norms == {k for k in keys if not k.endswith("/bias")}
    pattern = _flat_keys(_job(orion_checkpoint[0], "trainable=[self_attn/q_proj, lm_head]"))
    assert pattern == {"params/model/layers/self_attn/q_proj/kernel", "params/lm_head/kernel"}
    lora = _flat_keys(_job(orion_checkpoint[0], "trainable=lora", "lora.targets=[q_proj,down_proj]"))
    assert lora == {f"lora/model/layers/{m}/{ab}" for m in ("self_attn/q_proj", "mlp/down_proj") for ab in "ab"}


def test_shared_weights_are_one_copy(job_exact_norms):
    """With `exact`, every linear kernel but lm_head equals the (recentered) teacher's: the student stores none of
    them, the step reads the teacher's, and the compiled step's arguments hold one copy."""
    job = job_exact_norms
    shared = {"/".join(k[1:]) for k in job.split.shared}
    for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
        assert f"model/layers/self_attn/{name}/kernel" in shared
    assert "model/embed_tokens/embedding" in shared and "lm_head/kernel" not in shared
    assert not set(job.split.frozen) & set(job.split.shared)
    variables = job.split.assemble(job.teacher_params)
    q = variables["params"]["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    assert q is job.teacher_params["model"]["layers"]["self_attn"]["q_proj"]["kernel"]

    optimizer = make_optimizer(1e-3, 1, 10, 0.0, 1.0)
    state = init_state(job.split, optimizer)
    step = make_train_step(LogitKL(job.teacher, job.student, job.cfg.loss), job.split, optimizer)
    batch = next(job.batches())
    args = (state, job.teacher_params, job.split.frozen, batch)
    compiled = step.lower(*args).compile()
    nbytes = lambda tree: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))  # noqa: E731
    full_student = nbytes(variables)
    assert compiled.memory_analysis().argument_size_in_bytes == nbytes(args)
    assert nbytes(args) < nbytes(job.teacher_params) + full_student * 0.5


def _run(job, steps, accum_batch=None):
    optimizer = make_optimizer(1e-2, 1, steps, 0.0, 1.0)
    state = init_state(job.split, optimizer)
    step = make_train_step(LogitKL(job.teacher, job.student, job.cfg.loss), job.split, optimizer)
    batches = job.batches()
    for _ in range(steps):
        batch = next(batches) if accum_batch is None else accum_batch
        state, metrics = step(state, job.teacher_params, job.split.frozen, batch)
    return state, metrics


def test_teacher_is_bit_identical_and_runs_are_reproducible(orion_checkpoint):
    job = _job(orion_checkpoint[0], "opm=center-lsq", "trainable=norms")
    before = jax.tree.map(np.array, job.teacher_params)
    state_a, metrics = _run(job, 4)
    jax.tree.map(np.testing.assert_array_equal, before, jax.tree.map(np.array, job.teacher_params))
    assert float(metrics["kl"]) > 0
    job_b = _job(orion_checkpoint[0], "opm=center-lsq", "trainable=norms")
    state_b, _ = _run(job_b, 4)
    jax.tree.map(np.testing.assert_array_equal, state_a.trainable, state_b.trainable)
    # and training changed something
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(state_a.trainable),
                                                           jax.tree.leaves(job.split.trainable)))


def test_optimizer_state_covers_only_trainable_leaves(job_exact_norms):
    state = init_state(job_exact_norms.split, make_optimizer(1e-3, 1, 10, 0.0, 1.0))
    trainable = sum(x.size for x in jax.tree.leaves(state.trainable))
    opt = sum(x.size for x in jax.tree.leaves(state.opt_state) if x.ndim > 0)
    assert opt == 2 * trainable  # Adam's two moments, nothing for frozen weights


def test_gradient_accumulation_equals_one_big_batch(orion_checkpoint):
    job = _job(orion_checkpoint[0], "opm=center", "trainable=norms")
    batches = job.batches()
    rows = np.concatenate([np.asarray(next(batches)).reshape(-1, 32) for _ in range(2)])  # 2 x 4 rows
    one, m1 = _run(job, 1, rows.reshape(1, 8, -1))
    accumulated, m2 = _run(job, 1, rows.reshape(2, 4, -1))
    assert float(m1["tokens"]) == float(m2["tokens"])
    np.testing.assert_allclose(float(m1["loss"]), float(m2["loss"]), rtol=1e-5)
    for a, b in zip(jax.tree.leaves(one.trainable), jax.tree.leaves(accumulated.trainable)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_bf16_keeps_fp32_master_copies(orion_checkpoint):
    job = _job(orion_checkpoint[0], "opm=absorb", "trainable=norms", "precision.params=bfloat16",
               "precision.compute=bfloat16")
    assert all(x.dtype == jnp.float32 for x in job.split.trainable.values())
    assert all(x.dtype == jnp.bfloat16 for x in job.split.frozen.values())
    state, metrics = _run(job, 2)
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(state.trainable))
    assert np.isfinite(float(metrics["loss"]))


def test_lora_starts_at_the_converted_model_and_merges_exactly(orion_checkpoint):
    job = _job(orion_checkpoint[0], "opm=absorb", "trainable=lora")
    variables = job.split.assemble(job.teacher_params)
    tokens = jnp.asarray(job.eval_rows[:2])
    plain = job.student.apply({"params": variables["params"]}, tokens)
    np.testing.assert_array_equal(job.student.apply(variables, tokens), plain)  # b = 0
    # A trained-looking adapter: applying it and merging it into the kernels give the same logits.
    lora = jax.tree.map(lambda x: x + 0.05 * jax.random.normal(jax.random.key(1), x.shape), variables["lora"])
    with_adapters = job.student.apply({"params": variables["params"], "lora": lora}, tokens)
    merged = job.student.apply({"params": merge_lora(variables["params"], lora, job.student.config.lora_scale)}, tokens)
    assert float(jnp.abs(with_adapters - plain).max()) > 1e-2
    np.testing.assert_allclose(merged, with_adapters, atol=2e-4, rtol=0)
