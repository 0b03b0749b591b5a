"""One definition of KL and agreement (`kept_jax.metrics`): checked against float64 NumPy from the definition, and
the conversion report (`metrics.compare`), the job's held-out evaluation (the chunked `LogitKL` sums) and
`bridge.verify` give the same numbers on the same models and tokens."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from bridge import verify
from bridge.checkpoint import load_checkpoint
from kept_jax.metrics import compare
from kept_jax.metrics import BUCKET_NAMES, POSITION_BUCKETS, score, summarize
from kept_jax.models import build_model
from kept_jax.xkd.losses import LossConfig
from kept_jax.xkd.objectives import LogitKL
from kept_jax.xkd.step import make_eval_step

TINY_ORION = "kept_jax/assets/tiny-orion"


def _reference(teacher_logits, student_logits, tokens) -> dict:
    """From the definition in float64: positions 0 .. T-2 of every row, buckets by position."""
    def log_softmax(z):
        z = np.asarray(z, np.float64)
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    lt, ls = log_softmax(teacher_logits)[:, :-1], log_softmax(student_logits)[:, :-1]
    kl = (np.exp(lt) * (lt - ls)).sum(-1)
    agree = (lt.argmax(-1) == ls.argmax(-1)).astype(np.float64)
    nll = -np.take_along_axis(ls, tokens[:, 1:, None], -1)[..., 0]
    positions = np.arange(tokens.shape[1] - 1)
    by_position = {}
    for name, (lo, hi) in zip(BUCKET_NAMES, POSITION_BUCKETS):
        inside = (positions >= lo) & (positions < (hi or 10**9))
        if inside.any():
            by_position[name] = {"kl": kl[:, inside].mean(), "agreement": agree[:, inside].mean(),
                                 "tokens": int(inside.sum()) * len(tokens)}
    return {"kl": kl.mean(), "agreement": agree.mean(), "student_nll": nll.mean(), "tokens": kl.size,
            "by_position": by_position}


def _assert_same(result: dict, reference: dict, rel: float) -> None:
    assert result["tokens"] == reference["tokens"]
    for key in ("kl", "agreement"):
        assert result[key] == pytest.approx(reference[key], rel=rel), key
    assert set(result["by_position"]) == set(reference["by_position"])
    for name, bucket in reference["by_position"].items():
        assert result["by_position"][name]["tokens"] == bucket["tokens"], name
        assert result["by_position"][name]["kl"] == pytest.approx(bucket["kl"], rel=rel), name
        assert result["by_position"][name]["agreement"] == pytest.approx(bucket["agreement"], rel=rel), name


def test_score_is_the_definition():
    rng = np.random.default_rng(0)
    tokens = rng.integers(0, 50, size=(3, 140))
    teacher, student = rng.normal(size=(3, 140, 50)) * 2, rng.normal(size=(3, 140, 50)) * 2
    with jax.enable_x64(True):
        sums = score(jnp.asarray(teacher), jnp.asarray(student), jnp.asarray(tokens))
        result = summarize({k: float(v) for k, v in sums.items()})
    reference = _reference(teacher, student, tokens)
    _assert_same(result, reference, rel=1e-12)
    assert result["student_nll"] == pytest.approx(reference["student_nll"], rel=1e-12)
    assert list(result["by_position"]) == ["0-8", "8-32", "32-128", "128+"]
    assert result["tokens"] == 3 * 139  # the last position of each row has no next token: never scored


@pytest.fixture(scope="module")
def two_models():
    """The tiny Orion teacher (fp32) and a student: the same model with every weight perturbed by 3%."""
    config, teacher_params, _ = load_checkpoint(TINY_ORION, compute_dtype="float32", param_dtype="float32")
    keys = iter(jax.random.split(jax.random.key(0), 1000))
    student_params = jax.tree.map(lambda x: x * (1 + 0.03 * jax.random.normal(next(keys), x.shape)), teacher_params)
    tokens = np.random.default_rng(1).integers(3, config.vocab_size, size=(2, 160)).astype(np.int32)
    model = build_model(config)
    logits = jax.jit(lambda p, t: model.apply({"params": p}, t))
    return config, model, teacher_params, student_params, tokens, logits(teacher_params, tokens), \
        logits(student_params, tokens)


def test_the_report_the_job_and_verify_score_alike(two_models):
    config, model, teacher_params, student_params, tokens, teacher_logits, student_logits = two_models
    reference = _reference(teacher_logits, student_logits, tokens)
    assert reference["kl"] > 1e-3  # the student really differs

    report = compare(model, teacher_params, model, student_params, [tokens[:1], tokens[1:]])

    objective = LogitKL(model, model, LossConfig(chunk_size=64))
    job_sums = make_eval_step(objective)({"params": student_params}, teacher_params, jnp.asarray(tokens))
    job = summarize({k: float(v) for k, v in job_sums.items() if k != "loss"})

    verified = verify._scores(np.asarray(teacher_logits), np.asarray(student_logits), tokens)
    for result in (report, job, verified):
        _assert_same(result, reference, rel=2e-4)
    assert verified["kl"] == pytest.approx(reference["kl"], rel=1e-9)  # verify scores in float64
