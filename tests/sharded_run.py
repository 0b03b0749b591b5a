"""A few XKD steps of the job on mesh layouts; run as a script under XLA_FLAGS=--xla_force_host_platform_device_count=8.

    python -m tests.sharded_run SOURCE OUT_DIR LAYOUTS_JSON

runs each layout of LAYOUTS_JSON ({name: mesh overrides}) in turn, in one process (JAX starts once), and writes
OUT_DIR/<name>.npz: the per-step metrics and the trained leaves, so that a test can compare layouts with a
one-device run.
"""

from __future__ import annotations

import json
import os
import sys

import numpy as np

STEPS = 3


def overrides(source: str, layout: dict) -> list[str]:
    return [f"source={source}", "trainable=all", f"train.steps={STEPS}", "train.log_every=1", "train.warmup=0",
            "train.lr=1e-3", "data.seq_len=32", "data.batch_size=8", "data.grad_accum=2", "data.calib_tokens=256",
            "data.eval_tokens=256", *(f"mesh.{k}={json.dumps(v)}" for k, v in layout.items())]


def run(source: str, layout: dict) -> dict[str, np.ndarray]:
    """Metrics per step and every trained leaf after the steps, plus how a few leaves were laid out."""
    import jax

    from kept_jax.train import Job, plan_job
    from kept_jax.train_config import load_config

    cfg, _ = load_config(None, overrides(source, layout))
    job = Job(plan_job(cfg, jax.device_count()))
    job.prepare()
    initial = {key: np.asarray(value) for key, value in job.split.trainable.items()}
    state = job.distill()
    out = {f"metric/{k}": np.asarray([h[k] for h in job.history]) for k in ("loss", "kl", "agreement", "grad_norm")}
    out["metric/eval_kl"] = np.asarray(job.evaluate(state.trainable)["kl"])
    for key, value in state.trainable.items():
        out["update/" + "/".join(key)] = np.asarray(jax.device_get(value)) - initial[key]
        # Shape of one device's shard: shows that the layout really split the leaf.
        out["shard/" + "/".join(key)] = np.asarray(value.addressable_shards[0].data.shape)
    q = job.teacher_params["model"]["layers"]["self_attn"]["q_proj"]["kernel"]
    out["teacher_shard/q_proj"] = np.asarray(q.addressable_shards[0].data.shape)
    out["devices"] = np.asarray(jax.device_count())
    return out


def hybrid_gradients(layout: dict | None) -> dict[str, np.ndarray]:
    """A random Mamba-2/attention hybrid (configs/models/tiny-hybrid.json with two B/C groups): a loss of its logits
    and the gradients, on one device or with its parameters laid out on a mesh by the default rules (the Mamba-2
    inner dimension over `tensor`, the hidden one over `fsdp`), and how out_proj was split."""
    import jax
    import jax.numpy as jnp

    from kept_jax import sharding
    from kept_jax.models import build_model, config_from_hf, init_params

    with open(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "models",
                           "tiny-hybrid.json"), encoding="utf-8") as f:
        config = config_from_hf({**json.load(f), "mamba_n_groups": 2})
    params = jax.tree.map(lambda x: x * 8, init_params(config, jax.random.key(0)))  # logits far from flat
    tokens = np.random.default_rng(0).integers(0, config.vocab_size, size=(8, 24))
    if layout:
        mesh = sharding.make_mesh(layout["data"], layout["fsdp"], layout["tensor"])
        params = jax.device_put(params, sharding.tree_shardings(params, sharding.logical_axes(config), mesh,
                                                                sharding.rules_from(None)))

    def loss(p):
        return jnp.mean(jax.nn.logsumexp(build_model(config).apply({"params": p}, tokens), axis=-1))

    value, grads = jax.jit(jax.value_and_grad(loss))(params)
    out = {"loss": np.asarray(value)}
    for path, grad in jax.tree_util.tree_leaves_with_path(grads):
        out["grad" + jax.tree_util.keystr(path)] = np.asarray(jax.device_get(grad))
    out_proj = params["model"]["layers"]["0"]["mamba"]["out_proj"]["kernel"]
    out["shard/out_proj"] = np.asarray(out_proj.addressable_shards[0].data.shape)
    return out


if __name__ == "__main__":
    source, out_dir, layouts = sys.argv[1], sys.argv[2], json.loads(sys.argv[3])
    for name, layout in layouts.items():
        np.savez(os.path.join(out_dir, f"{name}.npz"), **run(source, layout))
    np.savez(os.path.join(out_dir, "hybrid.npz"), **hybrid_gradients(layouts["mixed"]))
