"""`python -m kept_jax.generate`: text from any checkpoint kept_jax reads (Orion, Llama, Llamba), in JAX.

    python -m kept_jax.generate --model DIR (--prompt TEXT | --file FILE) [--max-new-tokens N] [--temperature T]
                                [--top-k K] [--top-p P] [--seed S] [--batch B] [--dtype float32|bfloat16]

One prompt, one row: the text streams to stdout as it is produced. Several rows (`--batch B` samples of one prompt,
or a `.jsonl` file of prompts, B per batch): one JSON line per row when its batch ends. stderr gets the compile
time and the prefill and decode speeds. `--temperature 0` (the default) is greedy. See `kept_jax/decoding.py`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from kept_jax.errors import KeptError, cli_entry


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m kept_jax.generate", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="Hugging Face checkpoint directory (Orion, Llama or Llamba) or GGUF "
                                                  "file (Llama)")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="the prompt text")
    source.add_argument("--file", help="a UTF-8 file holding the prompt; a .jsonl file holds one prompt per line "
                                       "(its 'prompt' or 'text' field)")
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
    p.add_argument("--tokenizer", metavar="DIR", help="take the tokenizer from DIR, a directory or a GGUF file "
                                                      "(published Llamba checkpoints ship without theirs: give the "
                                                      "Llama teacher's)")
    args = p.parse_args(argv)
    if args.max_new_tokens < 1:
        p.error(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    if args.batch < 1:
        p.error(f"--batch must be at least 1, got {args.batch}")
    return args


def read_prompts(args: argparse.Namespace) -> list[str]:
    """The prompt texts: --prompt, a whole --file, or each line of a .jsonl --file."""
    from kept_jax.fileio import read_text

    if args.prompt is not None:
        prompts = [args.prompt]
    elif args.file.endswith(".jsonl"):
        prompts = []
        for number, line in enumerate(read_text(args.file, "--file").splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                prompts.append(record["prompt"] if "prompt" in record else record["text"])
            except (json.JSONDecodeError, TypeError, KeyError):
                raise KeptError(f"--file {args.file!r} line {number} is not a JSON object with a 'prompt' or 'text' "
                                "field") from None
        if not prompts:
            raise KeptError(f"--file {args.file!r} holds no prompts; write one JSON object per line")
    else:
        prompts = [read_text(args.file, "--file")]
    for i, text in enumerate(prompts):
        if not isinstance(text, str) or not text.strip():
            where = "--prompt" if args.prompt is not None else f"prompt {i + 1} of --file {args.file!r}"
            raise KeptError(f"{where} is empty; give some text to continue")
    return prompts


def end_ids(files_dir: str, config) -> tuple[list[int], int | None]:
    """End-of-sequence ids (config.json's and generation_config.json's) and the pad id."""
    from kept_jax.fileio import read_optional_json

    generation = read_optional_json(os.path.join(files_dir, "generation_config.json"))
    eos = generation.get("eos_token_id", config.eos_token_id)
    pad = generation.get("pad_token_id", config.pad_token_id)
    ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
    return ids, pad


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


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from kept_jax.decoding import Sampling

    sampling = Sampling(args.temperature, args.top_k, args.top_p)  # checked before anything is loaded
    texts = read_prompts(args)

    import jax
    import numpy as np

    from bridge.checkpoint import load_checkpoint, load_checkpoint_tokenizer, load_config, open_checkpoint
    from kept_jax.decoding import Generator

    config = load_config(args.model)
    tokenizer = load_checkpoint_tokenizer(args.tokenizer or args.model, config.architecture,
                               "give one with --tokenizer DIR (the teacher's directory for a Llamba checkpoint)")
    prompts = [tokenizer.encode(text) for text in texts]
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

    config, params, report = load_checkpoint(args.model, compute_dtype=args.dtype, param_dtype=args.dtype)
    eos_ids, pad_id = end_ids(open_checkpoint(args.model).files_dir, config)
    generator = Generator(config, sampling, eos_ids, pad_id)
    params = generator.prepare(params)

    # Rows: B samples of one prompt, or the prompts B at a time (the last batch topped up with repeats, dropped).
    rows = prompts * args.batch if len(prompts) == 1 else prompts
    batch = args.batch if len(prompts) > 1 else len(rows)
    batches = [rows[i:i + batch] for i in range(0, len(rows), batch)]
    started = time.perf_counter()
    generator.compile(params, batch, longest, max_new)
    print(f"{args.model}: {config.describe()}, {report.num_params:,} parameters, {args.dtype} on "
          f"{jax.devices()[0].device_kind}; compiled in {time.perf_counter() - started:.1f} s", file=sys.stderr)

    key = jax.random.key(args.seed)
    stream = Streamer(tokenizer, eos_ids) if len(rows) == 1 else None
    prefill_s = decode_s = 0.0
    prompt_tokens = decode_tokens = 0
    for number, chunk in enumerate(batches):
        real = len(chunk)
        key, batch_key = jax.random.split(key)
        result = generator.generate(params, chunk + [chunk[0]] * (batch - real), max_new, batch_key,
                                    prompt_length=longest, steps_per_call=1 if stream else None,
                                    on_step=(lambda state: stream(list(np.asarray(state.tokens[0, :int(state.count)]))))
                                    if stream else None)
        prefill_s += result.prefill_s
        decode_s += result.decode_s
        prompt_tokens += sum(len(p) for p in chunk)
        decode_tokens += sum(max(len(t) - 1, 0) for t in result.tokens[:real])
        if stream:
            stream(result.tokens[0], last=True)
            continue
        for i, (ids, stopped) in enumerate(zip(result.tokens[:real], result.stopped_at_eos[:real])):
            prompt, sample = (number * batch + i, 0) if len(prompts) > 1 else (0, i)
            text = tokenizer.decode([t for t in ids if t not in eos_ids])
            print(json.dumps({"prompt": prompt, "sample": sample, "completion": text, "new_tokens": len(ids),
                              "stop": "eos" if stopped else "length"}, ensure_ascii=False), flush=True)
    print(f"prefill: {prompt_tokens:,} tokens in {prefill_s:.3f} s ({prompt_tokens / max(prefill_s, 1e-9):,.0f} "
          f"tokens/s); decode: {decode_tokens:,} tokens in {decode_s:.3f} s "
          f"({decode_tokens / max(decode_s, 1e-9):,.0f} tokens/s, batch {batch})", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
