"""kept_jax as an lm-evaluation-harness model (kept_jax/harness.py) and `python -m kept_jax.evaluate`.

Independent implementations: lm-eval's own Transformers model (`hf`, PyTorch) on a Llama; the float64 Llamba oracle
(bridge/llamba_oracle.py, written from the math) on a Llamba, which Transformers cannot load.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed: pip install -e '.[test]'")

from lm_eval.api.instance import Instance

from kept_jax import evaluate
from kept_jax.errors import KeptError
from kept_jax.harness import KeptJaxLM, bucket
from tests import fixtures as fx

# Contexts and continuations of many lengths (an empty context among them), from the held-out documentation.
LINES = ["NAME", "    chunk - Simple class to read IFF chunks.", "DESCRIPTION",
         "    An IFF chunk (used in formats such as AIFF, TIFF, RMFF (RealMedia File", "Format)) has the following"]
PAIRS = [("", "Python Library Documentation"), ("NAME\n", "    chunk"), ("\n".join(LINES[:3]), "\n" + LINES[3]),
         ("\n".join(LINES), " structure:"), (" ".join(LINES) * 3, " The ID is a 4-byte string."),
         ("x = ", "1 + 2")]


@pytest.fixture(scope="module")
def llama(tmp_path_factory) -> str:
    """A tiny Llama with a context long enough for every request, and a byte-level BPE tokenizer."""
    model = fx.make_llama({**fx.base_config("tiny-llama"), "max_position_embeddings": 1024}, seed=2)
    path = fx.save_llama(model, str(tmp_path_factory.mktemp("harness") / "llama"))
    fx.add_byte_level_tokenizer(path, model.config.vocab_size)
    return path


def _requests(kind: str, args_list) -> list:
    return [Instance(request_type=kind, doc={}, arguments=args, idx=i) for i, args in enumerate(args_list)]


def test_buckets_grow_by_half_or_a_third_within_the_window():
    assert [bucket(n, 1024) for n in (1, 32, 33, 49, 65, 100, 600, 1000, 1024)] == [32, 32, 48, 64, 96, 128, 768,
                                                                                    1024, 1024]
    assert bucket(700, 512) == 512 and bucket(3000, None) == 3072


def test_the_offline_tasks_alone_are_indexed_when_they_are_all_that_is_asked():
    from kept_jax.harness import task_manager

    assert sorted(task_manager(["kept_heldout", "kept_next_line"]).all_tasks) == ["kept_heldout", "kept_next_line"]


def test_loglikelihoods_equal_transformers(llama):
    """The same requests through lm-eval's own `hf` model and through kept_jax: every log-likelihood to 1e-4, the
    same greedy flags; and rolling log-likelihoods over windows of 64 tokens."""
    from lm_eval.models.huggingface import HFLM

    ours = KeptJaxLM(pretrained=llama, batch_size=4, max_length=64)
    theirs = HFLM(pretrained=llama, dtype="float32", batch_size=4, max_length=64, device="cpu")
    got, want = ours.loglikelihood(_requests("loglikelihood", PAIRS)), theirs.loglikelihood(
        _requests("loglikelihood", PAIRS))
    assert np.allclose([g[0] for g in got], [w[0] for w in want], atol=1e-4, rtol=0), (got, want)
    assert [g[1] for g in got] == [w[1] for w in want]
    documents = [("\n".join(LINES * k),) for k in (1, 4)]  # one window, then several
    got, want = (lm.loglikelihood_rolling(_requests("loglikelihood_rolling", documents)) for lm in (ours, theirs))
    assert np.allclose(got, want, atol=1e-4 * max(abs(w) for w in want), rtol=0), (got, want)


def test_requests_of_many_lengths_compile_a_bounded_number_of_programs(llama):
    """35 lengths in 7 buckets: 7 programs with batches of 3 rows; with 4, a bucket's last windows go out in 1, 2 or 4
    rows, which adds programs (at most 3 per bucket) but changes no score."""
    lengths = list(range(1, 240, 7))
    windows = [(list(range(3, 3 + n)), list(range(4, 4 + n)), 1) for n in lengths]
    three = KeptJaxLM(pretrained=llama, batch_size=3, max_length=256)
    scores = three.score_windows(windows)
    assert three._score._cache_size() == len({bucket(n, 256) for n in lengths}) == 7
    four = KeptJaxLM(pretrained=llama, batch_size=4, max_length=256)
    assert np.allclose(four.score_windows(windows), scores, atol=1e-5)
    assert 7 < four._score._cache_size() <= 3 * 7


def test_generation_stops_at_the_stop_sequence_and_equals_the_decode_engine(llama):
    from kept_jax.decoding import Generator

    ours = KeptJaxLM(pretrained=llama, batch_size=2, max_gen_toks=12)
    requests = _requests("generate_until", [("def main():", {"until": ["\n\n"], "max_gen_toks": 12}),
                                            ("import os", {"until": [], "max_gen_toks": 12})])
    texts = ours.generate_until(requests)
    generator = Generator(ours.config, eos_ids=ours._eos_ids)
    for (prompt, kwargs), text in zip([r.args for r in requests], texts):
        ids = ours.tok_encode(prompt)
        tokens = generator.generate(Generator.prepare(ours.params), [ids], 12).tokens[0]
        full = ours.tok_decode([t for t in tokens if t not in ours._eos_ids])
        stops = [full.find(s) for s in kwargs["until"] if s in full]
        assert text == full[:min(stops)] if stops else text == full


@pytest.fixture(scope="module")
def llamba(tmp_path_factory):
    """A random Llamba checkpoint with a byte-level tokenizer: (path, HF config, tensors)."""
    from tests.test_llamba import _hf_config, random_tensors, write_checkpoint

    hf = {**_hf_config("tied-grouped-expand2"), "vocab_size": 600}
    tensors = random_tensors(hf)
    path = write_checkpoint(tmp_path_factory.mktemp("harness") / "llamba", hf, tensors)
    fx.add_byte_level_tokenizer(path, 600)
    return path, hf, tensors


def _oracle_logprobs(hf, tensors, tokens) -> np.ndarray:
    """log p(tokens[t + 1] | tokens[:t + 1]) for every t, from the float64 oracle run over the whole sequence."""
    from bridge.llamba_oracle import oracle_logits

    tokens = np.asarray(tokens)
    logits = np.asarray(oracle_logits(hf, tensors, tokens[None, :-1]), np.float64)[0][:, :hf["vocab_size"]]
    logits = logits - logits.max(-1, keepdims=True)
    logprobs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
    return logprobs[np.arange(len(tokens) - 1), tokens[1:]]


def test_a_llamba_scores_as_the_float64_oracle(llamba):
    """Transformers has no Llamba: each log-likelihood against the oracle's, token by token, in float64."""
    path, hf, tensors = llamba
    ours = KeptJaxLM(pretrained=path, batch_size=4, max_length=128)
    got = ours.loglikelihood(_requests("loglikelihood", PAIRS[1:4]))
    for (context, continuation), (logp, _) in zip(PAIRS[1:4], got):
        context_ids, continuation_ids = ours._encode_pair(context, continuation)
        want = _oracle_logprobs(hf, tensors, context_ids + continuation_ids)[-len(continuation_ids):].sum()
        assert logp == pytest.approx(want, abs=1e-4)


def test_a_llamba_carries_its_state_across_windows(llamba):
    """carry_state=True: documents of up to four 32-token windows (and a request longer than one) score as the oracle
    scores them whole; lm-eval's restarting windows score them differently; generation follows a prompt longer than
    a window whole (40 new tokens, more than the window too)."""
    from kept_jax.decoding import Generator

    path, hf, tensors = llamba
    ours = KeptJaxLM(pretrained=path, batch_size=2, max_length=32, carry_state=True)
    documents = ["\n".join(LINES[:k]) for k in (1, 2, 3, 5)]
    got = ours.loglikelihood_rolling(_requests("loglikelihood_rolling", [(d,) for d in documents]))
    windowed = KeptJaxLM(pretrained=path, batch_size=2, max_length=32).loglikelihood_rolling(
        _requests("loglikelihood_rolling", [(documents[-1],)]))
    for document, logp in zip(documents, got):
        tokens = ours.tok_encode(document)
        assert logp == pytest.approx(_oracle_logprobs(hf, tensors, [ours.prefix_token_id, *tokens]).sum(), abs=2e-4)
    assert len(ours.tok_encode(documents[-1])) > 3 * 32 and abs(windowed[0] - got[-1]) > 1.0
    prompt = "\n".join(LINES)  # longer than a window: generation follows all of it
    (text,) = ours.generate_until(_requests("generate_until", [(prompt, {"until": [], "max_gen_toks": 40})]))
    tokens = Generator(ours.config, eos_ids=ours._eos_ids).generate(ours.prepared, [ours.tok_encode(prompt)], 40)
    assert text == ours.tok_decode([t for t in tokens.tokens[0] if t not in ours._eos_ids])
    (_, width, _), = ours._generators[0.0]._starts  # the prefill took the whole prompt, not its last window
    assert width >= len(ours.tok_encode(prompt)) > 32
    context, continuation = "\n".join(LINES), " structure:"
    (logp, _), = ours.loglikelihood(_requests("loglikelihood", [(context, continuation)]))
    context_ids, continuation_ids = ours._encode_pair(context, continuation)
    want = _oracle_logprobs(hf, tensors, context_ids + continuation_ids)[-len(continuation_ids):].sum()
    assert len(context_ids) > 32 and logp == pytest.approx(want, abs=1e-4)


def test_the_evaluate_command_prints_and_writes_the_side_by_side_table(llama, tmp_path, capsys):
    out = tmp_path / "eval"
    assert evaluate.main(["--teacher", llama, "--student", llama, "--limit", "6", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| kept_next_line | acc |" in printed and "| kept_heldout | bits_per_byte |" in printed
    rows = json.loads((out / "evaluation.json").read_text())["rows"]
    assert {(r["task"], r["metric"]) for r in rows} >= {("kept_next_line", "acc"), ("kept_heldout", "bits_per_byte")}
    assert all(r["ratio"] == pytest.approx(1.0) for r in rows)  # the same model on both sides
    assert os.path.isfile(out / "evaluation.md")


@pytest.mark.parametrize("argv, message", [
    (["--tasks", "no_such_task"], "Tasks not found: no_such_task"),
    (["--teacher", "/nonexistent/model"], "does not exist"),
])
def test_evaluate_refuses_what_it_cannot_run(llama, capsys, argv, message):
    base = {"--teacher": llama, "--student": llama}
    for flag, value in zip(argv[::2], argv[1::2]):
        base[flag] = value
    assert evaluate.main([x for kv in base.items() for x in kv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err


def test_impossible_model_arguments_are_refused(llama):
    with pytest.raises(KeptError, match="max_length=2048 is beyond the model's context of 1024"):
        KeptJaxLM(pretrained=llama, max_length=2048)
    with pytest.raises(KeptError, match="this llama has attention layers, whose cache grows"):
        KeptJaxLM(pretrained=llama, carry_state=True)
    with pytest.raises(KeptError, match="1 devices do not divide by fsdp x tensor x data = 2"):
        KeptJaxLM(pretrained="no/such/checkpoint", fsdp=2)  # the mesh is checked before anything is read


def test_an_orion_scores_as_kept_jaxs_own_score_command(orion_checkpoint, tmp_path, capsys):
    """Transformers has no Orion class: each log-likelihood against the logits `python -m kept_jax.score` saves for
    the same token ids (context then continuation)."""
    from kept_jax import score

    ours = KeptJaxLM(pretrained=orion_checkpoint[0], batch_size=4)
    for (context, continuation), (logp, greedy) in zip(PAIRS[1:4], ours.loglikelihood(
            _requests("loglikelihood", PAIRS[1:4]))):
        context_ids, continuation_ids = ours._encode_pair(context, continuation)
        ids = context_ids + continuation_ids
        logits_file = tmp_path / f"{len(ids)}.npy"
        assert score.main(["--model", orion_checkpoint[0], "--tokens", ",".join(map(str, ids)),
                           "--save-logits", str(logits_file)]) == 0
        logits = np.load(logits_file).astype(np.float64)[:-1]
        logprobs = logits - logits.max(-1, keepdims=True)
        logprobs -= np.log(np.exp(logprobs).sum(-1, keepdims=True))
        targets = np.asarray(ids[1:])
        n = len(continuation_ids)
        assert logp == pytest.approx(logprobs[np.arange(len(targets)), targets][-n:].sum(), abs=1e-4)
        assert greedy == bool((logits.argmax(-1)[-n:] == targets[-n:]).all())
    capsys.readouterr()


def test_chat_templated_requests_use_the_checkpoints_template(llama):
    """lm-eval's --apply_chat_template: the conversation written as the tokenizer files' template writes it (the
    fixture's ChatML), then generated from like any prompt."""
    ours = KeptJaxLM(pretrained=llama, batch_size=1, max_gen_toks=4)
    assert "<|im_start|>" in ours.chat_template(True)
    text = ours.apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text.startswith("<|im_start|>system\n")  # the template's default system turn
    assert text.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    (completion,) = ours.generate_until(_requests("generate_until", [(text, {"until": [], "max_gen_toks": 4})]))
    assert isinstance(completion, str)


def test_task_scores_equal_transformers_on_the_offline_tasks(llama):
    """Through lm-eval's own evaluator: the same accuracies on kept_next_line and bits per byte on kept_heldout."""
    from lm_eval.models.huggingface import HFLM

    from kept_jax.harness import task_manager

    manager = task_manager(["kept_next_line", "kept_heldout"])

    def results(model):
        out = lm_eval.simple_evaluate(model=model, tasks=["kept_next_line", "kept_heldout"], limit=12,
                                      task_manager=manager)["results"]
        return out["kept_next_line"]["acc,none"], out["kept_heldout"]["bits_per_byte,none"]

    ours = results(KeptJaxLM(pretrained=llama, batch_size=4, max_length=256))
    theirs = results(HFLM(pretrained=llama, dtype="float32", batch_size=4, max_length=256, device="cpu"))
    assert ours[0] == theirs[0] and ours[1] == pytest.approx(theirs[1], rel=1e-5)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def _on_hosts(command: list[str], processes: int = 2, devices: int = 2) -> list[tuple[str, str]]:
    """`python COMMAND` as `processes` processes of one distributed JAX run, each seeing `devices` simulated CPU
    devices: each one's (stdout, stderr), after checking that every one succeeded."""
    port = _free_port()
    flags = " ".join(filter(None, [os.environ.get("XLA_FLAGS"), f"--xla_force_host_platform_device_count={devices}"]))
    running = [subprocess.Popen([sys.executable, *command(i)], cwd=fx.REPO, text=True, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, env={
                                    **os.environ, "XLA_FLAGS": flags, "JAX_COORDINATOR_ADDRESS": f"localhost:{port}",
                                    "JAX_NUM_PROCESSES": str(processes), "JAX_PROCESS_ID": str(i)})
               for i in range(processes)]
    outputs = [p.communicate(timeout=600) for p in running]
    assert [p.returncode for p in running] == [0] * processes, "\n".join(err[-3000:] for _, err in outputs)
    return outputs


def test_two_hosts_of_two_devices_give_the_one_device_answers(llama, llamba, tmp_path):
    """Two processes of two devices each, the first driving and the second following (kept_jax.lockstep): a Llama's
    weights sharded fsdp x tensor = 2 x 2 over both, and a Llamba's rows over data = 4 while it carries its state,
    give the same log-likelihoods, rolling log-likelihoods and generations as this process's one device."""
    from tests.harness_mesh_probe import answers

    documents = [["\n".join(LINES * k)] for k in (1, 3)]
    generate = [["def main():", {"until": ["\n\n"], "max_gen_toks": 12}], ["import os", {"max_gen_toks": 12}]]
    runs = [({"pretrained": llama, "batch_size": 2, "max_length": 64, "max_gen_toks": 12}, {"fsdp": 2, "tensor": 2},
             {"loglikelihood": PAIRS, "loglikelihood_rolling": documents, "generate_until": generate}),
            ({"pretrained": llamba[0], "batch_size": 4, "max_length": 32, "carry_state": True}, {},
             {"loglikelihood": PAIRS[1:4], "loglikelihood_rolling": documents, "generate_until": generate})]
    spec = tmp_path / "requests.json"
    spec.write_text(json.dumps([{"model_args": {**args, **mesh}, "requests": requests}
                                for args, mesh, requests in runs]))
    (out, _), (followed, _) = _on_hosts(lambda i: ["-m", "tests.harness_mesh_probe", str(spec)])
    assert "loglikelihood" not in followed  # only the leader reports
    for got, (args, _, requests) in zip(json.loads(out.strip().splitlines()[-1]), runs):
        want = json.loads(json.dumps(answers(args, requests)))  # tuples as lists, as the probe's JSON has them
        assert [g[1] for g in got["loglikelihood"]] == [w[1] for w in want["loglikelihood"]]
        assert np.allclose([g[0] for g in got["loglikelihood"]], [w[0] for w in want["loglikelihood"]], atol=1e-4)
        assert np.allclose(got["loglikelihood_rolling"], want["loglikelihood_rolling"], rtol=1e-5)
        assert got["generate_until"] == want["generate_until"]


def _numbers(responses) -> list[float]:
    """The numbers in lm-eval's logged responses (log-likelihoods, as numbers or strings), without the flags."""
    if isinstance(responses, (list, tuple)):
        return [x for r in responses for x in _numbers(r)]
    return [] if isinstance(responses, bool) or responses in ("True", "False") else [float(responses)]


@pytest.mark.slow
def test_the_command_runs_as_two_processes(llama, tmp_path):
    """`python -m kept_jax.harness run` launched as two processes (about 50 s here): the first runs lm-eval and writes,
    the second follows; every logged response equals a one-process run's. Run with `pytest -m slow -k two_processes`."""
    from kept_jax.harness import task_manager

    args = ["-m", "kept_jax.harness", "run", "--model", "kept_jax", "--model_args", f"pretrained={llama},fsdp=2",
            "--batch_size", "4", "--tasks", "kept_next_line", "kept_heldout", "--limit", "6", "--log_samples"]
    _on_hosts(lambda i: [*args, "--output_path", str(tmp_path / f"host{i}")])
    assert not (tmp_path / "host1").exists()  # only the first process writes
    one = lm_eval.simple_evaluate(model=KeptJaxLM(pretrained=llama, batch_size=4), limit=6, log_samples=True,
                                  tasks=["kept_next_line", "kept_heldout"],
                                  task_manager=task_manager(["kept_next_line", "kept_heldout"]))
    for task in ("kept_next_line", "kept_heldout"):
        (path,) = (tmp_path / "host0").rglob(f"samples_{task}_*.jsonl")
        got = [json.loads(line)["resps"] for line in path.read_text().splitlines()]
        want = [sample["resps"] for sample in one["samples"][task]]
        assert len(got) == len(want) == 6 and len(_numbers(got)) == len(_numbers(want)) >= 6
        assert np.allclose(_numbers(got), _numbers(want), rtol=1e-5)
