"""`python -m bridge.verify --hf DIR [--reference DIR]`: an exported directory, checked through Transformers.

Loads DIR with `AutoTokenizer` and `AutoModelForCausalLM` (`trust_remote_code=False`, fp32), tokenizes held-out
text with the exported tokenizer, and compares Transformers' logits with kept_jax's on the same tokens: max-abs
error, KL and top-1 agreement, with a non-zero exit past `--atol`/`--max-kl`. With `--reference` (the source Orion
directory) it also reports KL(teacher || exported) and agreement, and fails past `--max-reference-kl` if given.
Finally it greedily generates a few tokens with `model.generate`.
"""

from __future__ import annotations

import os
import sys

import numpy as np

from kept_jax.errors import ArgumentParser, KeptError, cli_entry, utf8_text


def parse_args(argv):
    p = ArgumentParser(prog="python -m bridge.verify", description=__doc__.split("\n\n")[0])
    p.add_argument("--hf", required=True, help="exported Hugging Face directory")
    p.add_argument("--reference", help="the source Orion directory, to compare with the teacher too")
    p.add_argument("--text-file", help="text to score (.jsonl 'text' field or plain text; default: embedded held-out)")
    p.add_argument("--tokens", type=int, default=1024, help="number of tokens compared")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--atol", type=float, default=1e-3, help="max-abs logit error allowed vs kept_jax")
    p.add_argument("--max-kl", type=float, default=1e-5, help="KL(Transformers || kept_jax) allowed, nats/token")
    p.add_argument("--max-reference-kl", type=float, help="KL(teacher || exported) allowed, nats/token")
    p.add_argument("--prompt", type=utf8_text, default="Return a new", help="prompt for the generation check")
    return p.parse_args(argv)


def _scores(p_logits: np.ndarray, q_logits: np.ndarray, rows: np.ndarray) -> dict:
    """`kept_jax.metrics` (the conversion report's and the job's definition), in float64."""
    import jax

    from kept_jax.metrics import score, summarize

    with jax.enable_x64(True):
        sums = score(jax.numpy.asarray(p_logits, np.float64), jax.numpy.asarray(q_logits, np.float64),
                     jax.numpy.asarray(rows))
        return summarize({key: float(value) for key, value in sums.items()})


def _kept_jax_logits(model_dir: str, rows: np.ndarray) -> np.ndarray:
    import jax

    from bridge.checkpoint import load_checkpoint
    from kept_jax.models import build_model

    config, params, _ = load_checkpoint(model_dir)
    model = build_model(config)
    apply = jax.jit(lambda p, t: model.apply({"params": p}, t))
    with jax.default_matmul_precision("highest"):
        return np.concatenate([np.asarray(apply(params, row[None])) for row in rows])


@cli_entry
def main(argv=None) -> int:
    args = parse_args(argv)
    if not os.path.isdir(args.hf):
        raise KeptError(f"--hf {args.hf!r} is not a directory")
    from kept_jax.config import read_config_json

    config_path = os.path.join(args.hf, "config.json")
    if os.path.isfile(config_path) and read_config_json(config_path).get("model_type") == "orion":
        raise KeptError(f"{args.hf} is an Orion checkpoint, which Transformers loads only with trust_remote_code; "
                        f"convert it first (python -m kept_jax.convert --source {args.hf} --out DIR) and verify DIR, "
                        f"with --reference {args.hf}")
    if args.reference:  # a damaged or unrelated reference is refused before any comparing
        from bridge.checkpoint import check_checkpoint

        reference, exported = check_checkpoint(args.reference), check_checkpoint(args.hf)
        if reference.vocab_size != exported.vocab_size:
            raise KeptError(f"--reference {args.reference} has a vocabulary of {reference.vocab_size:,} tokens and "
                            f"--hf {args.hf} one of {exported.vocab_size:,}: they are not a teacher and its export; "
                            "give the checkpoint the export was converted or distilled from")
    try:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError:
        raise KeptError("bridge.verify needs torch and transformers: pip install 'kept_jax[torch]'") from None
    from kept_jax import corpus
    from kept_jax.metrics import format_by_position

    print(f"verify: loading {args.hf} with Transformers (trust_remote_code=False)", file=sys.stderr, flush=True)
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.hf, trust_remote_code=False)
        hf_model = AutoModelForCausalLM.from_pretrained(args.hf, trust_remote_code=False, dtype=torch.float32).eval()
    except (OSError, ValueError, KeyError) as e:
        raise KeptError(f"Transformers cannot load {args.hf!r} with trust_remote_code=False: {e}") from None

    rows = corpus.token_rows(args.text_file or corpus.HELDOUT, lambda d: tokenizer(d, add_special_tokens=False).input_ids,
                             args.seq_len, tokenizer.eos_token_id)[: max(1, -(-args.tokens // args.seq_len))]
    print(f"verify: scoring {rows.size:,} tokens with Transformers and with kept_jax", file=sys.stderr, flush=True)
    with torch.no_grad():
        hf_logits = np.concatenate([hf_model(input_ids=torch.as_tensor(r[None], dtype=torch.long),
                                             use_cache=False).logits.float().numpy() for r in rows])
    ours = _kept_jax_logits(args.hf, rows)
    max_abs = float(np.abs(hf_logits - ours).max())
    scores = _scores(hf_logits, ours, rows)
    kl, agreement = scores["kl"], scores["agreement"]
    print(f"Transformers ({type(hf_model).__name__}) vs kept_jax on {rows.size:,} tokens: max-abs logit error "
          f"{max_abs:.3e}, KL {kl:.3e} nats/token, top-1 agreement {agreement:.2%} ({scores['tokens']:,} scored "
          "positions)")
    failures = []
    if not max_abs <= args.atol:
        failures.append(f"max-abs error {max_abs:.3e} > --atol {args.atol:g}")
    if not kl <= args.max_kl:
        failures.append(f"KL {kl:.3e} > --max-kl {args.max_kl:g}")

    if args.reference:
        print(f"verify: scoring them with the teacher {args.reference}", file=sys.stderr, flush=True)
        teacher = _kept_jax_logits(args.reference, rows)
        reference = _scores(teacher, hf_logits, rows)
        ref_kl = reference["kl"]
        print(f"teacher {args.reference} vs exported: KL(teacher || exported) {ref_kl:.3e} nats/token, "
              f"top-1 agreement {reference['agreement']:.2%}; {format_by_position(reference['by_position'])}")
        if args.max_reference_kl is not None and not ref_kl <= args.max_reference_kl:
            failures.append(f"KL(teacher || exported) {ref_kl:.3e} > --max-reference-kl {args.max_reference_kl:g}")

    layer_types = getattr(hf_model.config, "layer_types", None) or ()
    if layer_types and not {"attention", "full_attention"} & set(layer_types):
        print("generate: skipped: Transformers' generate needs an attention layer for its cache, and this "
              "GraniteMoeHybrid has none (python -m kept_jax.generate runs it)")
    else:
        prompt = tokenizer(args.prompt, return_tensors="pt")
        with torch.no_grad():
            generated = hf_model.generate(**prompt, max_new_tokens=16, do_sample=False)
        print(f"generate: {tokenizer.decode(generated[0], skip_special_tokens=True)!r}")
    if failures:
        raise KeptError("verification failed: " + "; ".join(failures))
    print("verified")
    return 0


if __name__ == "__main__":
    sys.exit(main())
