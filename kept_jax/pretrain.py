"""`python -m kept_jax.pretrain`: trains the embedded tiny Orion teacher from scratch, reproducibly.

A SentencePiece BPE tokenizer (as Orion ships: unk 0, bos 1, eos 2, byte fallback) and an Orion-architecture model
(LayerNorm with bias at every norm site) trained with AdamW, weight decay, warmup + cosine, on the embedded corpus
(Python standard-library documentation). Writes an HF Orion directory: config.json, model.safetensors (bf16, as Orion
ships), tokenizer.model, tokenizer_config.json and pretrain_log.json (settings, losses, held-out perplexity).
"""

from __future__ import annotations

import json
import math
import os
import sys
import time

from kept_jax.errors import ArgumentParser, KeptError, cli_entry

DEFAULT_OUT = os.path.join(os.path.dirname(__file__), "assets", "tiny-orion")
EVAL_BATCH = 16  # held-out rows per evaluation call, whatever --batch trains with (16: the default --batch)
TINY_ORION = dict(
    architecture="orion", vocab_size=2048, hidden_size=192, intermediate_size=512, num_hidden_layers=4,
    num_attention_heads=3, num_key_value_heads=3, head_dim=64, rms_norm_eps=1e-5,
    bos_token_id=1, eos_token_id=2, pad_token_id=0, dtype="bfloat16",
)


def parse_args(argv):
    p = ArgumentParser(prog="python -m kept_jax.pretrain", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=DEFAULT_OUT, help="output directory (default: the embedded asset)")
    p.add_argument("--force", action="store_true", help="replace a non-empty output directory")
    p.add_argument("--steps", type=int, default=900)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-tokens", type=int,
                   help="score this many held-out tokens (whole rows of --seq-len) at each evaluation (default: all)")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--weight-decay", type=float, default=0.1)
    p.add_argument("--warmup", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--mean-init", type=float, default=1.0,
                   help="scale of the writers' initial component along the all-ones direction (see writer_means)")
    p.add_argument("--gather-corpus", action="store_true", help="first regather the corpus from this Python's stdlib")
    p.add_argument("--describe", nargs="?", const=DEFAULT_OUT, metavar="DIR",
                   help="do not train: report held-out perplexity, norm biases and residual means of DIR")
    return p.parse_args(argv)


def describe(model_dir: str, seq_len: int = 256, batch: int = 16) -> dict:
    """Held-out NLL of the saved weights, LayerNorm beta sizes, and how far the residual stream is from zero-mean."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from bridge.checkpoint import load_checkpoint
    from kept_jax import corpus
    from kept_jax.models import build_model
    from kept_jax.tokenizer import load_tokenizer

    config, params, _ = load_checkpoint(model_dir)
    if config.architecture != "orion":
        raise KeptError(f"--describe reads Orion checkpoints; {model_dir!r} is {config.architecture!r}")
    tokenizer = load_tokenizer(model_dir, "orion")
    rows = corpus.token_rows(corpus.HELDOUT, tokenizer.encode, seq_len, config.eos_token_id)
    model = build_model(config)

    @jax.jit
    def batch_stats(tokens):
        logits = model.apply({"params": params}, tokens)
        logp = jax.nn.log_softmax(logits[:, :-1])
        nll = -jnp.sum(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))
        inputs, _ = model.apply({"params": params}, tokens, method="norm_inputs", mutable="intermediates")
        # |mean over hidden| / rms over hidden, per token: 0 for a zero-mean stream.
        ratio = {k: jnp.sum(jnp.abs(x.mean(-1)) * jax.lax.rsqrt((x * x).mean(-1))) for k, x in inputs.items()}
        return nll, ratio

    nll, ratios, tokens = 0.0, {}, 0
    for i in range(0, len(rows), batch):
        b_nll, b_ratio = jax.device_get(batch_stats(jnp.asarray(rows[i : i + batch])))
        nll += float(b_nll)
        tokens += rows[i : i + batch].size
        for k, v in b_ratio.items():
            ratios[k] = ratios.get(k, 0.0) + float(v)
    predicted = len(rows) * (seq_len - 1)
    layers = params["model"]["layers"]

    def rms(x):
        return float(np.sqrt(np.mean(np.square(np.asarray(x, np.float64)))))

    return {
        "heldout_tokens": int(predicted),
        "heldout_nll": nll / predicted,
        "heldout_perplexity": float(np.exp(nll / predicted)),
        "beta_rms": {
            "input_layernorm": [rms(b) for b in layers["input_layernorm"]["bias"]],
            "post_attention_layernorm": [rms(b) for b in layers["post_attention_layernorm"]["bias"]],
            "norm": rms(params["model"]["norm"]["bias"]),
        },
        "gamma_rms": {"norm": rms(params["model"]["norm"]["weight"])},
        "residual_mean_over_rms": {k: v / tokens for k, v in ratios.items()},
    }


def writer_means(params: dict, scale: float, key) -> dict:
    """Adds to each residual writer (embedding rows, o_proj, down_proj) a random component along the all-ones output
    direction, `scale` times the init std: every token then shifts the residual stream's mean over the hidden index.

    A LayerNorm model cannot see that direction (every reader of the stream removes the mean), so the loss gives
    it zero gradient and only weight decay shrinks it: it stands in for the residual-stream means that real
    checkpoints carry and that the OPM strategies must handle (recentering).
    """
    import jax

    std = 0.02 * scale
    k_embed, k_o, k_down = jax.random.split(key, 3)
    model = dict(params["model"])
    embed = model["embed_tokens"]["embedding"]
    model["embed_tokens"] = {"embedding": embed + std * jax.random.normal(k_embed, (embed.shape[0], 1))}
    layers = dict(model["layers"])
    for k, (group, name) in zip((k_o, k_down), (("self_attn", "o_proj"), ("mlp", "down_proj"))):
        kernel = layers[group][name]["kernel"]  # [layers, in, out]: one shift per input feature, on every output
        shifted = kernel + std * jax.random.normal(k, kernel.shape[:2] + (1,))
        layers[group] = {**layers[group], name: {**layers[group][name], "kernel": shifted}}
    model["layers"] = layers
    return {**params, "model": model}


def train_tokenizer(docs: list[str], out_dir: str, vocab_size: int) -> str:
    import sentencepiece as spm

    prefix = os.path.join(out_dir, "tokenizer")
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(line for doc in docs for line in doc.splitlines() if line.strip()),
        model_prefix=prefix, vocab_size=vocab_size, model_type="bpe", unk_id=0, bos_id=1, eos_id=2, pad_id=-1,
        byte_fallback=True, character_coverage=0.9999, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, num_threads=1, minloglevel=2,
    )
    os.remove(prefix + ".vocab")
    _clear_model_prefix(prefix + ".model")
    return prefix + ".model"


def _clear_model_prefix(path: str) -> None:
    """SentencePiece records where it wrote the model (a temporary path); the shipped file should not."""
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    with open(path, "rb") as f:
        proto.ParseFromString(f.read())
    proto.trainer_spec.model_prefix = "tokenizer"
    with open(path, "wb") as f:
        f.write(proto.SerializeToString())


@cli_entry
def main(argv=None) -> int:
    args = parse_args(argv)
    if args.describe:
        print(json.dumps(describe(args.describe), indent=2))
        return 0
    from bridge.hf_export import write_params
    from kept_jax.fileio import atomic_output_dir, check_output_dir

    check_output_dir(args.out, args.force)
    if args.eval_tokens is not None and args.eval_tokens < args.seq_len:
        raise KeptError(f"--eval-tokens {args.eval_tokens} is less than one row of --seq-len {args.seq_len}; give at "
                        "least that many, or leave it out to score the whole held-out text")
    import jax
    import jax.numpy as jnp
    import numpy as np
    import optax
    import sentencepiece as spm

    from kept_jax import corpus
    from kept_jax.data import Tokenize, first_rows
    from kept_jax.models import LlamaConfig, build_model, init_params

    if args.gather_corpus:
        print("corpus: train %d chars, held-out %d chars" % corpus.gather())
    train_docs, heldout_docs = corpus.read_documents(corpus.TRAIN), corpus.read_documents(corpus.HELDOUT)
    # The context it advertises is the one it is trained on: outside tools take their window from config.json.
    config = LlamaConfig(**TINY_ORION, max_position_embeddings=args.seq_len)
    log: dict = {"args": vars(args) | {"out": None}, "config": config.to_hf_dict(), "eval": []}

    with atomic_output_dir(args.out, args.force) as tmp:
        sp_path = train_tokenizer(train_docs, tmp, config.vocab_size)
        sp = spm.SentencePieceProcessor(model_file=sp_path)
        tokenize = Tokenize(sp.encode, sp.eos_id())
        train, heldout = (first_rows(docs, tokenize, args.seq_len, sys.maxsize) for docs in (train_docs, heldout_docs))
        if args.eval_tokens is not None:
            heldout = heldout[: args.eval_tokens // args.seq_len]
        print(f"tokens: train {train.size:,} ({train.shape[0]} rows), held-out {heldout.size:,}")

        model = build_model(config)
        init_key, mean_key = jax.random.split(jax.random.key(args.seed))
        params = writer_means(init_params(config, init_key), args.mean_init, mean_key)
        schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, args.warmup, args.steps, end_value=args.lr / 10)
        # No decay on norms (their biases are what the conversion must handle) or on embeddings' rows' scale.
        decay_mask = jax.tree_util.tree_map_with_path(lambda path, _: path[-1].key == "kernel", params)
        optimizer = optax.chain(
            optax.clip_by_global_norm(1.0),
            optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=args.weight_decay, mask=decay_mask),
        )
        opt_state = optimizer.init(params)

        def loss_fn(p, tokens):
            logits = model.apply({"params": p}, tokens)
            logp = jax.nn.log_softmax(logits[:, :-1])
            return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))

        @jax.jit
        def step(p, s, tokens):
            loss, grads = jax.value_and_grad(loss_fn)(p, tokens)
            updates, s = optimizer.update(grads, s, p)
            return optax.apply_updates(p, updates), s, loss

        eval_loss = jax.jit(loss_fn)

        def heldout_nll(p):  # token-weighted: the last batch may be short
            sums = [eval_loss(p, heldout[i : i + EVAL_BATCH]) * len(heldout[i : i + EVAL_BATCH])
                    for i in range(0, len(heldout), EVAL_BATCH)]
            return float(np.sum(sums) / len(heldout))

        rng = np.random.default_rng(args.seed)
        order, cursor, t0, losses = rng.permutation(len(train)), 0, time.time(), []
        for i in range(1, args.steps + 1):
            if cursor + args.batch > len(order):
                order, cursor = rng.permutation(len(train)), 0
            batch = jnp.asarray(train[order[cursor : cursor + args.batch]])
            cursor += args.batch
            params, opt_state, loss = step(params, opt_state, batch)
            losses.append(float(loss))
            if i % 100 == 0 or i == args.steps:
                nll = heldout_nll(params)
                log["eval"].append({"step": i, "train_loss": float(np.mean(losses[-100:])), "heldout_nll": nll})
                rate = i * args.batch * args.seq_len / (time.time() - t0)
                print(f"step {i:5d}  train loss {np.mean(losses[-100:]):.4f}  held-out NLL {nll:.4f}  "
                      f"ppl {math.exp(nll):.2f}  {rate:,.0f} tok/s", flush=True)

        nll = log["eval"][-1]["heldout_nll"]
        log.update(heldout_nll=nll, heldout_perplexity=math.exp(nll), heldout_tokens=int(heldout.size - len(heldout)),
                   train_tokens_seen=args.steps * args.batch * args.seq_len, seconds=round(time.time() - t0, 1))
        write_params(tmp, params, config, "bfloat16")
        with open(os.path.join(tmp, "tokenizer_config.json"), "w", encoding="utf-8") as f:
            json.dump({"tokenizer_class": "OrionTokenizer", "add_bos_token": False, "add_eos_token": False,
                       "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<unk>"}, f, indent=2)
        with open(os.path.join(tmp, "pretrain_log.json"), "w", encoding="utf-8") as f:
            json.dump(log, f, indent=2)
    print(f"wrote {args.out}: held-out perplexity {math.exp(nll):.2f} (bf16 weights as saved are scored by the tests)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
