"""`python -m kept_jax.generate`: text from any checkpoint kept_jax reads (Orion, Llama, Llamba, hybrid), in JAX.

    python -m kept_jax.generate --model DIR|FILE.gguf (--prompt TEXT | --file FILE) [--chat [--system TEXT]]
                                [--max-new-tokens N] [--temperature T] [--top-k K] [--top-p P] [--seed S]
                                [--batch B] [--dtype float32|bfloat16]

One prompt, one row: the text streams to stdout as it is produced. Several rows (`--batch B` samples of one prompt,
or a `.jsonl` file of prompts, B per batch): one JSON line per row when its batch ends. `--chat` puts each prompt
in the checkpoint's chat template as the user's turn (after `--system TEXT`); a `.jsonl` line may instead hold a
whole conversation, `{"messages": [{"role": ..., "content": ...}, ...]}`. stderr gets the compile time and what the
user waited: the time to the first token and the decode speed. `--temperature 0` (the default) is greedy. Before
anything is loaded, the request is checked against the memory it needs. See `kept_jax/decoding.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from kept_jax.errors import ArgumentParser, KeptError, cli_entry, utf8_text
from kept_jax.quantize import DEFAULT_GROUP_SIZE, GROUP_SIZES, SCHEMES, check_scheme, quantize_params, weight_bytes

STREAM_STEPS = 1  # decode steps between two prints of a streamed row (one compiled loop, called again each time)
# With quantized weights each call of the loop costs far more (SmolLM2: 140 ms int8, 460 ms int4, against 40 ms fp32,
# docs/generation.md), so a quantized stream prints every few tokens instead of every token.
QUANTIZED_STREAM_STEPS = 8


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m kept_jax.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="Hugging Face checkpoint directory (Orion, Llama, Llamba, hybrid) or GGUF "
                                                  "file (Llama)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", type=utf8_text, help="the prompt text")
    source.add_argument("--file", help="a UTF-8 file holding the prompt; a .jsonl file holds one prompt per line "
                                       "(its 'prompt' or 'text' field) or one conversation (its 'messages' field)")
    p.add_argument("--chat", action="store_true", help="apply the checkpoint's chat template: the prompt is the "
                                                       "user's turn, and the model answers as the assistant")
    p.add_argument("--system", type=utf8_text, help="with --chat: the system message before the user's turn")
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most per row (128)")
    p.add_argument("--temperature", type=float, default=0.0, help="0 (default) is greedy")
    p.add_argument("--top-k", type=int, default=0, help="sample among the K most likely tokens (0: off)")
    p.add_argument("--top-p", type=float, default=1.0, help="sample among the most likely tokens whose probability "
                                                             "reaches P (1: off)")
    p.add_argument("--seed", type=int, default=0, help="PRNG seed for sampling")
    p.add_argument("--batch", type=int, default=1, help="rows per batch: samples of one prompt, or prompts of a "
                                                        ".jsonl file taken B at a time (1)")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"),
                   help="compute and parameter dtype (bfloat16 on GPUs)")
    p.add_argument("--quantize", choices=SCHEMES,
                   help="weight-only quantization of the linear layers: int8 per output channel, int4 in groups")
    p.add_argument("--group-size", type=int,
                   help=f"with --quantize int4: inputs per scale ({', '.join(map(str, GROUP_SIZES))}; "
                        f"{DEFAULT_GROUP_SIZE})")
    p.add_argument("--quantize-head", action="store_true",
                   help="with --quantize: the (untied) output head too; the embedding always stays in --dtype")
    p.add_argument("--tokenizer", metavar="DIR", help="take the tokenizer (and chat template) from DIR, a directory or "
                                                      "a GGUF file (published Llamba checkpoints ship without theirs: "
                                                      "give the Llama teacher's)")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        p.error(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.batch < 1:
        p.error(f"--batch must be at least 1, got {args.batch}")
    if args.system is not None and not args.chat:
        raise KeptError("--system is the system message of a chat: add --chat")
    if not args.quantize and (args.quantize_head or args.group_size is not None):
        raise KeptError("--group-size and --quantize-head set how --quantize quantizes: add --quantize int8 or int4")
    if args.quantize == "int8" and args.group_size is not None:
        raise KeptError("--group-size sets int4's groups, and int8 has one scale per output channel: drop "
                        "--group-size, or use --quantize int4")
    args.group_size = DEFAULT_GROUP_SIZE if args.group_size is None else args.group_size
    if args.quantize:
        check_scheme(args.quantize, args.group_size)
    return args


def _messages(record, where: str) -> list[dict[str, str]]:
    """A conversation from a .jsonl line: a list of {"role": str, "content": str}."""
    messages = record.get("messages")
    if (not isinstance(messages, list) or not messages
            or not all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                       for m in messages)):
        raise KeptError(f"{where}: 'messages' must be a non-empty list of {{\"role\": ..., \"content\": ...}} objects "
                        "with string values")
    return messages


def read_prompts(args: argparse.Namespace) -> list[str | list[dict[str, str]]]:
    """The prompts: texts (--prompt, a whole --file, the 'prompt' or 'text' of each .jsonl line) or conversations
    (a .jsonl line's 'messages'; with --chat, each text as the user's turn after the --system message)."""
    from kept_jax.fileio import jsonl_records, read_text

    if args.prompt is not None:
        prompts = [args.prompt]
    elif args.file.endswith(".jsonl"):
        prompts = []
        for where, record in jsonl_records(args.file, "--file"):
            if "messages" in record:
                prompts.append(_messages(record, where))
            elif "prompt" in record or "text" in record:
                prompts.append(record["prompt"] if "prompt" in record else record["text"])
            else:
                raise KeptError(f"{where}: no 'prompt', 'text' or 'messages' field; give each line one of them")
        if not prompts:
            raise KeptError(f"--file {args.file!r} holds no prompts; write one JSON object per line")
    else:
        prompts = [read_text(args.file, "--file")]
    for i, prompt in enumerate(prompts):
        text = prompt if isinstance(prompt, str) else "".join(m["content"] for m in prompt)
        if not isinstance(text, str) or not text.strip():
            where = "--prompt" if args.prompt is not None else f"prompt {i + 1} of --file {args.file!r}"
            raise KeptError(f"{where} is empty; give some text to continue")
    if args.chat:
        system = [{"role": "system", "content": args.system}] if args.system is not None else []
        prompts = [system + [{"role": "user", "content": p}] if isinstance(p, str) else p for p in prompts]
    return prompts


def end_ids(files_dir: str, config) -> tuple[list[int], int | None]:
    """End-of-sequence ids (config.json's and generation_config.json's) and the pad id."""
    from kept_jax.fileio import read_optional_json

    generation = read_optional_json(os.path.join(files_dir, "generation_config.json"))
    eos = generation.get("eos_token_id", config.eos_token_id)
    pad = generation.get("pad_token_id", config.pad_token_id)
    ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return ids, pad


def chat_prompt_ids(files_dir: str, conversations, eos_ids: list[int]) -> tuple[list[list[int]], list[int]]:
    """The conversations' prompt ids (assistant turn opened) and `eos_ids` with the template's end-of-turn token
    added: a chat answer stops there as well as at the model's end token."""
    from kept_jax.tokenizer import chat_ids

    ids, chat_eos = chat_ids(files_dir, conversations)
    return ids, list(dict.fromkeys(eos_ids + ([chat_eos] if chat_eos is not None else [])))


def greedy_chat(config, params, files_dir: str, questions: list[str], max_new: int) -> list[str]:
    """Greedy answers of a model (`config`, a params tree in memory) to single-turn `questions`, prompted with the
    chat template of `files_dir`'s tokenizer and stopped at its end token: what `generate --chat --file` prints, for
    a model a job holds (the teacher, the student before and after training). The job checks for a chat template
    before it loads anything."""
    from kept_jax.decoding import Generator
    from kept_jax.tokenizer import load_tokenizer

    eos_ids, pad_id = end_ids(files_dir, config)
    ids, eos_ids = chat_prompt_ids(files_dir, [[{"role": "user", "content": q}] for q in questions], eos_ids)
    generator = Generator(config, eos_ids=eos_ids, pad_id=pad_id)
    result = generator.generate(generator.prepare(params), ids, max_new, prompt_length=max(len(i) for i in ids))
    tokenizer = load_tokenizer(files_dir, config.architecture)
    return [tokenizer.decode([t for t in row if t not in eos_ids]) for row in result.tokens]


class Streamer:
    """Prints one row's text as its tokens arrive: the text of all ids so far, less what was printed, held back
    while it ends in an incomplete character."""

    def __init__(self, tokenizer, eos_ids):
        self.tokenizer, self.eos_ids, self.printed = tokenizer, set(eos_ids), ""

    def __call__(self, ids: list[int], last: bool = False) -> None:
        text = self.tokenizer.decode([t for t in ids if t not in self.eos_ids])
        if text.startswith(self.printed) and (last or not text.endswith("\ufffd")):
            sys.stdout.write(text[len(self.printed):])
            self.printed = text
        sys.stdout.write("\n" if last else "")
        sys.stdout.flush()

    def on_step(self, tokens, count: int) -> None:
        """The decode loop's callback: the row's ids so far, sliced on the host (no program per token)."""
        self(tokens[0, :count].tolist())


def check_memory(generator, config, batch: int, prompt_length: int, max_new: int, quantize=lambda p: p) -> None:
    """Compiles the prefill and the decode loop on abstract weights (the compilation the run needs anyway) and
    refuses a request whose peak, by XLA's accounting plus what the cache grown to its last length adds, is more than
    the device has free: before any weight is loaded or any buffer allocated."""
    import jax

    from kept_jax.memory import compiled_peak_bytes, free_bytes, gib
    from kept_jax.models import abstract_params

    abstract = jax.eval_shape(lambda p: generator.prepare(quantize(p)), abstract_params(config))
    start, advance = generator.compile(abstract, batch, prompt_length, max_new)

    def cache_bytes(length: int) -> int:
        cache = jax.eval_shape(lambda: config.empty_cache(batch, length))
        return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))

    # The programs compiled hold the first cache length; the last one, and its growth from the one before (both
    # held while the cache is copied), cost what their caches add.
    lengths = generator.cache_lengths(prompt_length, max_new)
    first, last = cache_bytes(lengths[0]), cache_bytes(lengths[-1])
    growth = last - first + (cache_bytes(lengths[-2]) if len(lengths) > 1 else 0)
    state_bytes = last + batch * max_new * 4
    needed = max(compiled_peak_bytes(start), compiled_peak_bytes(advance)) + growth
    free = free_bytes()
    if free is not None and needed > free:
        what = "KV cache" if config.max_position_embeddings is not None else "recurrent state"
        raise KeptError(f"generating {max_new:,} tokens for {batch} row(s) needs about {gib(needed)} "
                        f"({gib(state_bytes)} of it the {what} and the generated ids, which grow with "
                        f"--max-new-tokens and --batch), and {jax.devices()[0].device_kind} has {gib(free)} free; "
                        "lower --max-new-tokens or --batch")


def _quantizer(args, config):
    """params -> params with the linear kernels quantized as --quantize asks (the identity without it)."""
    if not args.quantize:
        return lambda params: params
    return lambda params: quantize_params(config, params, args.quantize, args.group_size, args.quantize_head)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from kept_jax.decoding import Sampling

    sampling = Sampling(args.temperature, args.top_k, args.top_p)  # checked before anything is loaded
    prompts = read_prompts(args)

    import jax

    from bridge.checkpoint import load_checkpoint, load_checkpoint_tokenizer, load_config, open_checkpoint, tokenizer_dir
    from kept_jax.decoding import Generator
    from kept_jax.tokenizer import chat_template

    config = load_config(args.model, compute_dtype=args.dtype, param_dtype=args.dtype)
    if args.quantize_head and config.tie_word_embeddings:
        raise KeptError(f"--quantize-head quantizes an untied output head, and {args.model}'s head is its embedding "
                        "(tied), which stays in --dtype: drop --quantize-head")
    tokenizer_source = args.tokenizer or args.model
    tokenizer = load_checkpoint_tokenizer(tokenizer_source, config.architecture,
                                          "give one with --tokenizer DIR (the teacher's directory for a Llamba "
                                          "checkpoint)")
    eos_ids, pad_id = end_ids(open_checkpoint(args.model).files_dir, config)
    if any(not isinstance(p, str) for p in prompts):
        files = tokenizer_dir(tokenizer_source)
        if chat_template(files) is None:
            raise KeptError(f"{tokenizer_source} has no chat template (tokenizer_config.json's chat_template or "
                            "chat_template.jinja), so it cannot be prompted as a chat; drop --chat (and 'messages') "
                            "and give the prompt as plain text, or give a tokenizer with a template (--tokenizer)")
        ids, eos_ids = chat_prompt_ids(files, [p for p in prompts if not isinstance(p, str)], eos_ids)
        ids = iter(ids)
        prompts = [tokenizer.encode(p) if isinstance(p, str) else next(ids) for p in prompts]
    else:
        prompts = [tokenizer.encode(text) for text in prompts]
    longest = max(len(p) for p in prompts)
    if min(len(p) for p in prompts) == 0:
        raise KeptError("a prompt encodes to no tokens; give some text to continue")
    outside = [t for p in prompts for t in p if not 0 <= t < config.vocab_size]
    if outside:
        raise KeptError(f"the tokenizer ({tokenizer.source}) gives id {outside[0]}, outside the model's vocabulary "
                        f"[0, {config.vocab_size}); use the model's own tokenizer")
    max_new = args.max_new_tokens
    limit = config.max_position_embeddings
    if limit is not None:
        if longest >= limit:
            raise KeptError(f"the prompt has {longest} tokens; the model's maximum is {limit} "
                            "(max_position_embeddings), and generation needs at least one more: shorten the prompt")
        if longest + max_new > limit:
            max_new = limit - longest
            print(f"note: --max-new-tokens lowered to {max_new}: the prompt ({longest} tokens) and the new tokens "
                  f"must fit in max_position_embeddings={limit}", file=sys.stderr)
    elif longest + max_new >= 2**31:
        raise KeptError(f"--max-new-tokens {max_new:,} and a prompt of {longest:,} tokens pass 2^31 positions; "
                        "lower --max-new-tokens")

    # Rows: B samples of one prompt, or the prompts B at a time (the last batch topped up with repeats, dropped).
    rows = prompts * args.batch if len(prompts) == 1 else prompts
    batch = args.batch if len(prompts) > 1 else len(rows)
    batches = [rows[i:i + batch] for i in range(0, len(rows), batch)]
    generator = Generator(config, sampling, eos_ids, pad_id)
    quantize = _quantizer(args, config)
    started = time.perf_counter()
    check_memory(generator, config, batch, longest, max_new, quantize)  # also refuses a group size before loading
    compile_s = time.perf_counter() - started

    config, params, report = load_checkpoint(args.model, compute_dtype=args.dtype, param_dtype=args.dtype)
    params = generator.prepare(quantize(params))
    scheme = {None: "", "int8": "int8 weights, ", "int4": f"int4/{args.group_size} weights, "}[args.quantize]
    print(f"{args.model}: {config.describe()}, {report.num_params:,} parameters ({scheme}"
          f"{weight_bytes(params) / 2**20:,.1f} MiB), {args.dtype} on {jax.devices()[0].device_kind}; compiled in "
          f"{compile_s:.1f} s", file=sys.stderr)

    key = jax.random.key(args.seed)
    stream = Streamer(tokenizer, eos_ids) if len(rows) == 1 else None
    steps_per_call = (QUANTIZED_STREAM_STEPS if args.quantize else STREAM_STEPS) if stream else None
    prefill_s = decode_s = 0.0
    prompt_tokens = decode_tokens = 0
    for number, chunk in enumerate(batches):
        real = len(chunk)
        key, batch_key = jax.random.split(key)
        result = generator.generate(params, chunk + [chunk[0]] * (batch - real), max_new, batch_key,
                                    prompt_length=longest, steps_per_call=steps_per_call,
                                    on_step=stream.on_step if stream else None)
        prefill_s += result.prefill_s
        decode_s += result.decode_s
        prompt_tokens += sum(len(p) for p in chunk)
        decode_tokens += sum(max(len(t) - 1, 0) for t in result.tokens[:real])
        if stream:
            stream(result.tokens[0], last=True)
            stop = ("; stopped at the end token" if result.stopped_at_eos[0]
                    else f"; stopped at --max-new-tokens ({max_new})")
            continue
        for i, (ids, stopped) in enumerate(zip(result.tokens[:real], result.stopped_at_eos[:real])):
            prompt, sample = (number * batch + i, 0) if len(prompts) > 1 else (0, i)
            text = tokenizer.decode([t for t in ids if t not in eos_ids])
            print(json.dumps({"prompt": prompt, "sample": sample, "completion": text, "new_tokens": len(ids),
                              "stop": "eos" if stopped else "length"}, ensure_ascii=False), flush=True)
    how = f"streamed{stop}" if stream else f"batch {batch}"
    print(f"prefill: {prompt_tokens:,} prompt tokens, first token after {prefill_s:.3f} s "
          f"({prompt_tokens / max(prefill_s, 1e-9):,.0f} tokens/s); decode: {decode_tokens:,} tokens in "
          f"{decode_s:.3f} s ({decode_tokens / max(decode_s, 1e-9):,.0f} tokens/s, {how}); wall times as waited, "
          "compilation excluded", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
