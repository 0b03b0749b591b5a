"""Generation (`kept_jax/decoding.py`, `python -m kept_jax.generate`) against independent implementations.

Llama and the exported KEPT student: greedy tokens equal Transformers' `generate(do_sample=False)`. Llamba (no
Transformers class): every decoded token's logits equal the full forward's at its position, which
tests/test_llamba.py checks against a float64 oracle; so do Orion's (no Transformers class either). Prompts of
different lengths share a right-padded batch, and batched generation equals one prompt at a time. Sampling filters
equal Transformers' logits processors.
"""

import json
import os

import jax
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.generation.logits_process import (TemperatureLogitsWarper, TopKLogitsWarper,
                                                    TopPLogitsWarper)

from bridge.checkpoint import load_checkpoint
from kept_jax import generate
from kept_jax.decoding import Generator, Sampling, filter_logits, logits_at, run_layers, sample
from kept_jax.errors import KeptError
from kept_jax.models import build_model
from tests.test_llamba import CASES, _hf_config, random_tensors, write_checkpoint

FP32_RELATIVE = 1e-5


def _hf_greedy(model, prompt: list[int], max_new: int, eos: int | None) -> list[int]:
    with torch.no_grad():
        out = model.generate(torch.tensor([prompt]), max_new_tokens=max_new, do_sample=False, eos_token_id=eos,
                             pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_greedy_matches_transformers_on_llama_batched_and_alone(llama_checkpoint):
    path, hf_model = llama_checkpoint
    config, params, _ = load_checkpoint(path)
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, config.vocab_size, n).tolist() for n in (7, 3, 12)]
    free = _hf_greedy(hf_model, prompts[1], 10, None)
    eos = free[4]  # a token the second prompt produces mid-way: that row must stop there, the others go on
    expected = [_hf_greedy(hf_model, p, 10, eos) for p in prompts]
    assert len(expected[1]) == 5 and expected[1][-1] == eos and max(map(len, expected)) == 10

    generator = Generator(config, eos_ids=[eos])
    params = generator.prepare(params)
    batched = generator.generate(params, prompts, 10)
    assert batched.tokens == expected
    assert batched.stopped_at_eos == [eos in row for row in expected] and batched.stopped_at_eos[1]
    alone = [generator.generate(params, [p], 10, prompt_length=12).tokens[0] for p in prompts]
    assert alone == expected


def test_greedy_matches_transformers_on_the_exported_kept_student(kept_export):
    path = kept_export[0]
    tokenizer = AutoTokenizer.from_pretrained(path)
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = [tokenizer(t).input_ids for t in ("Python Library Documentation: module os", "Return a new list of")]
    expected = [_hf_greedy(hf_model, p, 24, tokenizer.eos_token_id) for p in prompts]

    config, params, _ = load_checkpoint(path)
    generator = Generator(config, eos_ids=[tokenizer.eos_token_id])
    assert generator.generate(generator.prepare(params), prompts, 24).tokens == expected


def test_a_growing_kv_cache_decodes_what_transformers_does(llama_checkpoint):
    """The KV cache starts short and is copied into longer ones as rows fill it (lengths 8, 16, 32, then prompt +
    max_new here): the tokens stay Transformers' greedy ones, for rows of different prompt lengths, one of them
    stopping early; a loop is compiled only for the lengths a generation reaches."""
    path, hf_model = llama_checkpoint
    config, params, _ = load_checkpoint(path)
    rng = np.random.default_rng(1)
    prompts = [rng.integers(0, config.vocab_size, n).tolist() for n in (5, 9, 2)]
    eos = _hf_greedy(hf_model, prompts[2], 12, None)[10]  # the third row stops at its 11th token
    expected = [_hf_greedy(hf_model, p, 30, eos) for p in prompts]
    assert len(expected[2]) <= 11 and max(map(len, expected)) == 30

    generator = Generator(config, eos_ids=[eos], first_cache_length=8)
    assert generator.cache_lengths(9, 30) == (16, 32, 39)
    params = generator.prepare(params)
    assert generator.generate(params, prompts, 30, steps_per_call=7).tokens == expected
    assert sorted(length for *_, length in generator._loops) == [16, 32, 39]
    short = Generator(config, eos_ids=[expected[0][2]], first_cache_length=8)  # stops after 3 tokens: the cache of 8 is enough
    assert short.generate(short.prepare(params), [prompts[0]], 4000).tokens == [expected[0][:3]]
    assert [length for *_, length in short._loops] == [8]


def _teacher_forced_errors(config, params, tokens: np.ndarray, prefill: list[int]) -> list[float]:
    """Prefill row i with its first prefill[i] tokens (one right-padded batch), then feed the rest of the row one
    token at a time; the largest relative error of each step's logits against the full forward's."""
    full = np.asarray(jax.jit(build_model(config).apply)({"params": params}, tokens))[..., : config.vocab_size]
    params = Generator.prepare(params)
    b, t = tokens.shape
    lengths = np.asarray(prefill, np.int32)
    positions = np.broadcast_to(np.arange(t, dtype=np.int32), (b, t))

    @jax.jit
    def prefill_logits(params, tokens):
        x, cache = run_layers(config, params, tokens, config.empty_cache(b, t), positions, lengths)
        return logits_at(config, params, x), cache

    logits, cache = prefill_logits(params, np.where(positions < lengths[:, None], tokens, 0))
    last = np.asarray(logits)[np.arange(b), lengths - 1]
    errors = [float(np.max(np.abs(last - full[np.arange(b), lengths - 1])) / np.abs(full).max())]

    @jax.jit
    def step(params, token, cache, position):
        x, cache = run_layers(config, params, token, cache, position, np.ones(b, np.int32))
        return logits_at(config, params, x)[:, 0], cache

    for offset in range(t - max(prefill)):
        position = lengths + offset
        logits, cache = step(params, tokens[np.arange(b), position][:, None], cache, position[:, None])
        reference = full[np.arange(b), position]
        errors.append(float(np.max(np.abs(np.asarray(logits) - reference)) / np.abs(reference).max()))
    return errors


@pytest.mark.parametrize("case", list(CASES))
def test_llamba_decoded_logits_equal_the_full_forward(case, tmp_path):
    """Prefills of 1, 2 and 5 tokens in one batch: the boundary falls inside the first conv window (d_conv 4 and
    3), in the middle of a later one, and the shorter rows' padding must leave their states alone."""
    hf = _hf_config(case)
    config, params, _ = load_checkpoint(write_checkpoint(tmp_path, hf, random_tensors(hf)))
    tokens = np.random.default_rng(3).integers(0, hf["vocab_size"], size=(3, 21)).astype(np.int32)
    errors = _teacher_forced_errors(config, params, tokens, [5, 1, 2])
    assert len(errors) == 1 + 21 - 5 and max(errors) <= FP32_RELATIVE, errors


def test_orion_decoded_logits_equal_the_full_forward(orion_checkpoint):
    config, params, _ = load_checkpoint(orion_checkpoint[0])
    tokens = np.random.default_rng(4).integers(0, config.vocab_size, size=(2, 14)).astype(np.int32)
    errors = _teacher_forced_errors(config, params, tokens, [6, 2])
    assert max(errors) <= FP32_RELATIVE, errors


def test_llamba_batched_generation_equals_one_prompt_at_a_time(tmp_path):
    hf = _hf_config("untied-one-group-silu")
    config, params, _ = load_checkpoint(write_checkpoint(tmp_path, hf, random_tensors(hf)))
    generator = Generator(config)
    params = generator.prepare(params)
    rng = np.random.default_rng(5)
    prompts = [rng.integers(0, hf["vocab_size"], n).tolist() for n in (9, 2, 5)]
    batched = generator.generate(params, prompts, 12, steps_per_call=5).tokens
    alone = [generator.generate(params, [p], 12, prompt_length=9).tokens[0] for p in prompts]
    assert batched == alone and all(len(t) == 12 for t in batched)
    assert all(max(t) < hf["vocab_size"] for t in batched)  # never the padded vocabulary


def test_streaming_compiles_nothing_per_token(llama_checkpoint, caplog):
    """A streamed row runs the same compiled loop again after each token: how many programs a generation compiles
    does not depend on how many tokens it makes (the stream once compiled two slices per token)."""
    import logging

    config, params, _ = load_checkpoint(llama_checkpoint[0])
    prompt = [1, 5, 9, 13]

    def compiles(max_new: int) -> int:
        generator = Generator(config)
        prepared = generator.prepare(params)
        caplog.clear()
        with jax.log_compiles(True), caplog.at_level(logging.WARNING):
            generator.generate(prepared, [prompt], max_new, steps_per_call=1,
                               on_step=generate.Streamer(_Ids(), ()).on_step)
        return sum("Compiling" in record.getMessage() for record in caplog.records)

    compiles(3)  # the one-time eager operations, compiled once per process
    assert compiles(3) == compiles(24)


class _Ids:
    def decode(self, ids):
        return " ".join(map(str, ids))


def test_reported_times_are_what_the_caller_waited(llama_checkpoint):
    """The decode time covers the caller's work between steps (printing a stream): every token's wait."""
    import time

    config, params, _ = load_checkpoint(llama_checkpoint[0])
    generator = Generator(config)
    params = generator.prepare(params)
    generator.generate(params, [[1, 5, 9]], 6, steps_per_call=1)  # compiled
    began = time.perf_counter()
    result = generator.generate(params, [[1, 5, 9]], 6, steps_per_call=1, on_step=lambda tokens, count: time.sleep(0.05))
    waited = time.perf_counter() - began
    assert result.decode_s >= 5 * 0.05 and result.prefill_s >= 0.05
    assert abs(result.prefill_s + result.decode_s - waited) < 0.05


def test_a_request_beyond_memory_is_refused_before_loading(kept_export, monkeypatch, capsys):
    """XLA's accounting of the compiled generation against the device's free memory, before any weight is read."""
    import bridge.checkpoint
    import kept_jax.memory

    monkeypatch.setattr(kept_jax.memory, "free_bytes", lambda device=None: 64 * 2**20)
    monkeypatch.setattr(bridge.checkpoint, "load_checkpoint", lambda *a, **k: pytest.fail("loaded the weights"))
    assert generate.main(["--model", kept_export[0], "--prompt", "Return", "--batch", "64",
                          "--max-new-tokens", "200"]) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1
    assert "needs about" in err and "of it the KV cache and the generated ids" in err and "0.1 GiB free" in err


# ---- Sampling ---------------------------------------------------------------------------------


@pytest.mark.parametrize("sampling", [Sampling(0.7), Sampling(1.3, top_k=5), Sampling(1.0, top_p=0.8),
                                      Sampling(0.5, top_k=7, top_p=0.6), Sampling(2.0, top_p=0.05)])
def test_sampling_filters_equal_transformers_logits_processors(sampling):
    logits = np.random.default_rng(6).standard_normal((4, 50)).astype(np.float32) * 3
    ids = torch.zeros((4, 1), dtype=torch.long)
    expected = torch.from_numpy(logits)
    for warper in ([TemperatureLogitsWarper(sampling.temperature)]
                   + ([TopKLogitsWarper(sampling.top_k)] if sampling.top_k else [])
                   + ([TopPLogitsWarper(sampling.top_p)] if sampling.top_p < 1 else [])):
        expected = warper(ids, expected)
    ours = np.asarray(filter_logits(logits, sampling))
    np.testing.assert_array_equal(np.isinf(ours), np.isinf(expected.numpy()))
    np.testing.assert_allclose(ours[~np.isinf(ours)], expected.numpy()[~np.isinf(ours)], rtol=1e-6)


def test_sampling_draws_from_the_filtered_distribution():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], np.float32))
    draws = np.asarray(sample(np.broadcast_to(logits, (20000, 4)), jax.random.key(0), Sampling(1.0, top_p=0.9)))
    frequencies = np.bincount(draws, minlength=4) / draws.size
    np.testing.assert_allclose(frequencies, [0.5 / 0.95, 0.3 / 0.95, 0.15 / 0.95, 0], atol=0.01)
    assert np.all(np.asarray(sample(np.broadcast_to(logits, (50, 4)), jax.random.key(1), Sampling(1.0, top_k=1))) == 0)


def test_sampled_generation_is_reproducible_with_its_seed(llama_checkpoint):
    config, params, _ = load_checkpoint(llama_checkpoint[0])
    generator = Generator(config, Sampling(1.5, top_k=50))
    params = generator.prepare(params)

    def run(seed):
        return generator.generate(params, [[1, 5, 9]] * 2, 16, jax.random.key(seed)).tokens

    assert run(0) == run(0) != run(1)
    assert run(0)[0] != run(0)[1]  # the rows draw independently


@pytest.mark.parametrize("kwargs, message", [(dict(temperature=-1), "temperature"), (dict(top_k=-2), "top-k"),
                                             (dict(top_p=0), "top-p"), (dict(top_p=1.5), "top-p")])
def test_sampling_settings_are_checked(kwargs, message):
    with pytest.raises(KeptError, match=message):
        Sampling(**kwargs)


# ---- The command line ---------------------------------------------------------------------------


def test_cli_streams_transformers_greedy_text(kept_export, capsys):
    path = kept_export[0]
    prompt = "Python Library Documentation: module os"
    tokenizer = AutoTokenizer.from_pretrained(path)
    hf_model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = tokenizer(prompt).input_ids
    expected = tokenizer.decode(_hf_greedy(hf_model, ids, 20, tokenizer.eos_token_id), skip_special_tokens=True)
    assert generate.main(["--model", path, "--prompt", prompt, "--max-new-tokens", "20"]) == 0
    out, err = capsys.readouterr()
    assert out == expected + "\n"
    assert "prefill:" in err and "first token after" in err and "tokens/s, streamed" in err


def test_cli_batches_a_jsonl_file_of_prompts_in_bfloat16(kept_export, tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in ("Return a new", "NAME", "module")) + "\n")
    argv = ["--model", kept_export[0], "--file", str(prompts), "--batch", "2", "--max-new-tokens", "6",
            "--dtype", "bfloat16", "--temperature", "0.8", "--top-p", "0.9", "--seed", "3"]
    assert generate.main(argv) == 0
    rows = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [r["prompt"] for r in rows] == [0, 1, 2] and all(1 <= r["new_tokens"] <= 6 for r in rows)


@pytest.mark.parametrize("scheme", [["--quantize", "int8", "--quantize-head"], ["--quantize", "int4",
                                                                               "--group-size", "64"]])
def test_cli_quantized_equals_a_checkpoint_of_its_dequantized_weights(scheme, kept_export, tmp_path, capsys):
    """`--quantize` decodes with the weights `kept_jax.quantize` makes: the same completions as the unquantized command
    on a checkpoint holding those weights dequantized (fp32), and the weights' size in the first line."""
    from bridge.hf_export import write_params
    from bridge.tokenizer_export import copy_tokenizer
    from kept_jax import quantize

    config, params, _ = load_checkpoint(kept_export[0])
    quantized = quantize.quantize_params(config, params, scheme[1], 64, "--quantize-head" in scheme)
    dequantized = str(tmp_path / "dequantized")
    os.makedirs(dequantized)
    write_params(dequantized, jax.tree.map(quantize.dequantize, quantized, is_leaf=quantize.is_quantized), config,
                 "float32")
    copy_tokenizer(kept_export[0], dequantized)
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text("\n".join(json.dumps({"prompt": p}) for p in ("Return a new", "The module")) + "\n")
    completions = []
    for argv in (["--model", kept_export[0], *scheme], ["--model", dequantized]):
        assert generate.main([*argv, "--file", str(prompts), "--batch", "2", "--max-new-tokens", "8"]) == 0
        out, err = capsys.readouterr()
        completions.append([json.loads(line)["completion"] for line in out.splitlines()])
        weights = f"{quantize.weight_bytes(quantized if '--quantize' in argv else params) / 2**20:,.1f} MiB"
        assert weights in err.splitlines()[0], err
    assert completions[0] == completions[1] and all(completions[0])


@pytest.mark.parametrize("argv, message", [
    (["--model", "{missing}", "--prompt", "hi"], "does not exist; pass a Hugging Face checkpoint directory or a .gguf"),
    (["--prompt", " \n"], "--prompt is empty"),
    (["--prompt", "word " * 300], "the model's maximum is 256"),
    (["--prompt", "hi", "--top-p", "0"], "top-p must be in"),
    (["--file", "{missing}"], "does not exist"),
    (["--file", "{empty_jsonl}"], "holds no prompts"),
    (["--prompt", "hi", "--tokenizer", "{other_tokenizer}"], "outside the model's vocabulary"),
    (["--prompt", "hi", "--chat"], "has no chat template (tokenizer_config.json's chat_template or "
                                   "chat_template.jinja), so it cannot be prompted as a chat; drop --chat"),
    (["--prompt", "hi", "--system", "Be brief."], "--system is the system message of a chat: add --chat"),
    (["--file", "{bad_messages}"], ".jsonl:1: 'messages' must be a non-empty list"),
    (["--prompt", "hi", "--quantize", "int4", "--group-size", "128"], "int4 group size 128 does not divide the input "
                                                                      "size 192 of model/layers/"),
    (["--prompt", "hi", "--quantize", "int4", "--group-size", "48"], "int4 group size 48 is not one of 32, 64, 128"),
    (["--prompt", "hi", "--group-size", "32"], "--group-size and --quantize-head set how --quantize quantizes"),
])
def test_cli_user_errors_get_one_line(argv, message, kept_export, tmp_path, capsys):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    other = tmp_path / "tokenizer"  # a tokenizer whose ids run past the tiny model's 2,048
    other.mkdir()
    (other / "tokenizer.json").write_text(json.dumps({
        "version": "1.0", "model": {"type": "WordLevel", "vocab": {"hi": 5000, "[UNK]": 0}, "unk_token": "[UNK]"},
        "pre_tokenizer": {"type": "Whitespace"}}))
    bad_messages = tmp_path / "chat.jsonl"
    bad_messages.write_text(json.dumps({"messages": [{"role": "user"}]}) + "\n")
    names = {"missing": str(tmp_path / "nothing"), "empty_jsonl": str(empty), "other_tokenizer": str(other),
             "bad_messages": str(bad_messages)}
    argv = [a.format(**names) for a in argv]
    if "--model" not in argv:
        argv = ["--model", kept_export[0], *argv]
    assert generate.main(argv) == 2
    out, err = capsys.readouterr()
    assert out == "" and err.count("\n") == 1 and message in err, err
