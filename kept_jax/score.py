"""`python -m kept_jax.score`: token count, mean NLL and perplexity of a text under a checkpoint (HF or GGUF)."""

from __future__ import annotations

import argparse
import math
import os
import sys

from kept_jax.errors import ArgumentParser, KeptError, cli_entry, utf8_text


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = ArgumentParser(
        prog="python -m kept_jax.score",
        description="Score text with a checkpoint (Orion, Llama, Llamba, hybrid; a Hugging Face directory or a GGUF file): "
                    "mean NLL and perplexity.",
    )
    parser.add_argument("--model", required=True, help="Hugging Face checkpoint directory or GGUF file")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", type=utf8_text, help="text to score, tokenized with the checkpoint's tokenizer")
    source.add_argument("--file", help="UTF-8 text file to score")
    source.add_argument("--tokens", help="comma-separated token ids, e.g. 1,2,3")
    parser.add_argument("--tokenizer", metavar="DIR", help="take the tokenizer from DIR (a directory or a GGUF file) "
                        "instead of --model (published Llamba checkpoints ship without theirs: give the Llama "
                        "teacher's)")
    parser.add_argument("--save-logits", metavar="OUT.npy", help="write fp32 logits [tokens, vocab] here")
    parser.add_argument("--force", action="store_true", help="overwrite an existing --save-logits file")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="compute dtype")
    return parser.parse_args(argv)


def _tokens(args: argparse.Namespace, architecture: str) -> list[int]:
    if args.tokens is not None:
        try:
            return [int(t) for t in args.tokens.replace(" ", "").split(",") if t != ""]
        except ValueError:
            raise KeptError(f"--tokens must be comma-separated integers, got {args.tokens!r}") from None
    from bridge.checkpoint import load_checkpoint_tokenizer
    from kept_jax.fileio import read_text

    text = args.text if args.file is None else read_text(args.file, "--file")
    return load_checkpoint_tokenizer(args.tokenizer or args.model, architecture).encode(text)


def _check_output(path: str, force: bool) -> None:
    parent = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(parent):
        raise KeptError(f"--save-logits: directory {parent!r} does not exist; create it first")
    if os.path.exists(path) and not force:
        raise KeptError(f"--save-logits: {path!r} already exists; choose another path or pass --force")
    from kept_jax.fileio import check_location

    check_location(parent)


@cli_entry
def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.save_logits:
        _check_output(args.save_logits, args.force)

    import jax
    import jax.numpy as jnp
    import numpy as np

    from bridge.checkpoint import load_checkpoint, load_config
    from kept_jax.models import build_model

    config = load_config(args.model)
    tokens = _tokens(args, config.architecture)
    if len(tokens) < 2:
        raise KeptError(f"need at least 2 tokens to score (each token is predicted from the ones before), got {len(tokens)}")
    bad = [t for t in tokens if not 0 <= t < config.vocab_size]
    if bad:
        raise KeptError(f"token id {bad[0]} is outside the model's vocabulary [0, {config.vocab_size})")

    config, params, report = load_checkpoint(args.model, compute_dtype=args.dtype, param_dtype=args.dtype)
    for name, why in report.skipped:
        print(f"note: skipped {name} ({why})", file=sys.stderr)
    if config.max_position_embeddings is not None and len(tokens) > config.max_position_embeddings:
        print(
            f"note: {len(tokens)} tokens exceed max_position_embeddings={config.max_position_embeddings}",
            file=sys.stderr,
        )

    model = build_model(config)
    ids = jnp.asarray(tokens, dtype=jnp.int32)[None]
    logits = jax.jit(lambda p, t: model.apply({"params": p}, t))(params, ids)[0]
    log_probs = jax.nn.log_softmax(logits[:-1], axis=-1)
    nll = float(-jnp.mean(jnp.take_along_axis(log_probs, ids[0, 1:, None], axis=-1)))

    print(f"model:      {args.model} ({config.architecture}, {report.num_params:,} parameters, {args.dtype})")
    print(f"tokens:     {len(tokens)} ({len(tokens) - 1} predicted)")
    print(f"mean NLL:   {nll:.6f} nats/token")
    print(f"perplexity: {math.exp(nll):.4f}")
    if args.save_logits:
        from kept_jax.fileio import atomic_file

        with atomic_file(args.save_logits, "wb") as f:
            np.save(f, np.asarray(logits, dtype=np.float32))
        print(f"logits:     {args.save_logits} {tuple(logits.shape)} float32")
    return 0


if __name__ == "__main__":
    sys.exit(main())
