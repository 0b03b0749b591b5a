"""kept_jax as an lm-evaluation-harness model: `--model kept_jax` for Orion, Llama, Llamba and hybrid checkpoints
(Hugging Face directories and GGUF files), in JAX.

    python -m kept_jax.harness run --model kept_jax --model_args pretrained=DIR,dtype=bfloat16 --batch_size 16 \\
        --tasks TASKS          # lm-eval's own command line, with kept_jax registered and the offline tasks found

lm-eval 0.4.13 discovers models only among its own modules, so `python -m kept_jax.harness` registers this class and
hands the rest of the command line to lm-eval's CLI unchanged (`import kept_jax.harness` does the same for its Python
API, `lm_eval.simple_evaluate(model="kept_jax", ...)`).

Static shapes, so that XLA compiles a bounded number of programs: every scored sequence is right-padded to the next
bucket length (32, 48, 64, 96, 128, ... at most `max_length`) and every call holds `batch_size` rows, or for the
last windows of a length a halving of it that holds them; a causal model's outputs at a position do not depend on
what follows it, so the padding changes nothing that is read. `loglikelihood_rolling`
cuts a document into `max_length` windows as lm-eval's own models do; `generate_until` runs kept_jax's decode engine
(greedy, or sampled with the request's temperature) on prompts padded the same way and cuts each completion at the
first stop sequence.

A Llamba has no context limit, only a state: with `carry_state=True` a sequence longer than `max_length` runs in
windows of `max_length` tokens that carry each layer's recurrent state (convolution window and SSM state) from one to
the next, so every token is scored on everything before it (lm-eval's rolling windows restart from nothing instead,
as a Transformer's must). The default keeps lm-eval's windows, so a Llamba and its Llama teacher are scored alike.

Devices and hosts as in training: the model is placed on a mesh of every device (`fsdp` and `tensor` ways of
sharding the weights, the rest `data`), each batch's rows split over data x fsdp. Launched as several processes (SLURM,
Open MPI, or JAX_COORDINATOR_ADDRESS with JAX_NUM_PROCESSES and JAX_PROCESS_ID), the first process runs lm-eval and
the others follow it (`kept_jax.lockstep`): each batch it computes is broadcast to them, and every process runs it.
"""

from __future__ import annotations

import functools
import os
import sys
from collections.abc import Callable, Iterable

import numpy as np

from kept_jax.errors import KeptError, cli_entry

TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "lm_eval_tasks")  # offline tasks
MIN_BUCKET = 32
DTYPES = ("float32", "bfloat16")
# What `--model_args` may set (KeptJaxLM's arguments; lm-eval passes batch_size, max_batch_size and device itself).
MODEL_ARGS = ("pretrained", "dtype", "batch_size", "max_length", "max_gen_toks", "carry_state", "fsdp", "tensor")


def bucket(length: int, max_length: int | None) -> int:
    """The padded length of a sequence: the next of 32, 48, 64, 96, 128, 192, ... (powers of two and one and a half
    times them, so padding adds at most half), at least MIN_BUCKET, at most max_length (if any)."""
    size = MIN_BUCKET
    while size < length:
        size = size * 3 // 2 if size & (size - 1) == 0 else size * 4 // 3
    return size if max_length is None else min(size, max_length)


def window(tokens: list[int], scored: int, max_length: int | None) -> tuple[list[int], list[int], int]:
    """(inputs, targets, how many of the last targets are scored) of the last max_length + 1 tokens (all of them
    when max_length is None)."""
    tokens = tokens if max_length is None else tokens[-(max_length + 1):]
    return tokens[:-1], tokens[1:], scored


def _make_class():
    import jax
    import jax.numpy as jnp
    import lm_eval.models  # noqa: F401  lm-eval's own models first: it imports them only into an empty registry
    from jax.sharding import NamedSharding, PartitionSpec
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model

    @register_model("kept_jax")
    class KeptJaxLM(TemplateLM):
        """`pretrained`: a checkpoint kept_jax reads; `dtype`: float32 or bfloat16; `batch_size`: rows per call (over
        all devices);
        `max_length`: tokens per scored window (default: the model's context, 2048 for a Llamba, which has none);
        `carry_state` (Llamba only): score longer sequences whole, window after window, carrying the state, and
        generate after whole prompts;
        `fsdp`, `tensor`: mesh ways that shard the weights (the remaining devices are `data`)."""

        def __init__(self, pretrained: str | None = None, dtype: str = "float32", batch_size: int | str = 8,
                     max_length: int | None = None, max_gen_toks: int = 256, carry_state: bool = False,
                     fsdp: int = 1, tensor: int = 1, max_batch_size: int | None = None, device: str | None = None,
                     **unused):
            # lm-eval passes its --batch_size, --max_batch_size and --device to every model; the model goes on a
            # mesh of every device, so `device` and `max_batch_size` have nothing to choose.
            super().__init__()
            from bridge.checkpoint import load_checkpoint, load_checkpoint_tokenizer
            from kept_jax import sharding
            from kept_jax.decoding import logits_at, run_layers
            from kept_jax.models import build_model

            check_model_args({"pretrained": pretrained, "dtype": dtype, **unused})
            if str(batch_size) == "auto" or int(batch_size) < 1:
                raise KeptError(f"batch_size={batch_size!r}: give a positive number of rows (no 'auto')")
            self.batch_size_per_gpu = int(batch_size)
            self.mesh = sharding.make_mesh(-1, int(fsdp), int(tensor))  # checked before the weights are read
            sharding.per_device_batch(self.batch_size_per_gpu, dict(self.mesh.shape), "batch_size",
                                      f"fsdp / tensor (the other devices of {jax.device_count()} are data)")
            self.config, params, _ = load_checkpoint(pretrained, compute_dtype=dtype, param_dtype=dtype)
            context = self.config.max_position_embeddings or 2048
            self._max_length = int(max_length or context)
            if self.config.max_position_embeddings and self._max_length > self.config.max_position_embeddings:
                raise KeptError(f"max_length={self._max_length} is beyond the model's context of "
                                f"{self.config.max_position_embeddings} tokens; give at most that")
            if carry_state and "attention" in self.config.layer_kinds:
                raise KeptError(f"carry_state=True: this {self.config.architecture} has attention layers, whose "
                                "cache grows with the sequence; only a model without attention (a Llamba, a hybrid "
                                "of Mamba-2 layers alone) carries a state of fixed size; leave carry_state out")
            self.carry_state = bool(carry_state)
            self.max_gen_toks = int(max_gen_toks)
            rules = sharding.rules_from(None)
            self.params = jax.device_put(params, sharding.tree_shardings(
                params, sharding.logical_axes(self.config), self.mesh, rules))
            self._rows = sharding.rows_sharding(self.mesh, rules)
            replicated = NamedSharding(self.mesh, PartitionSpec())
            self.tokenizer_ = load_checkpoint_tokenizer(pretrained, self.config.architecture,
                                                        "lm-eval scores text: give a checkpoint with tokenizer files")
            self.pretrained = pretrained
            eos = self.config.eos_token_id
            self._eot = int(eos[0] if isinstance(eos, (list, tuple)) else eos if eos is not None else 0)
            self._eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (self._eot,)
            vocab = self.config.vocab_size
            model = build_model(self.config)

            def sums(logits, targets, mask):
                """Each row's sum of log p(target) over the mask, and whether every masked target is the argmax."""
                logits = logits.astype(jnp.float32)
                picked = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), targets[..., None], -1)[..., 0]
                greedy = jnp.argmax(logits, -1) == targets
                return jnp.sum(picked * mask, -1), jnp.all(greedy | (mask == 0), -1)

            @functools.partial(jax.jit, out_shardings=replicated)  # every host reads the results
            def score(params, inputs, targets, mask):
                return sums(model.apply({"params": params}, inputs)[..., :vocab], targets, mask)

            @functools.partial(jax.jit, out_shardings=(replicated, replicated, self._rows))
            def score_carried(prepared, cache, inputs, targets, mask, lengths):
                # One window of a longer sequence, following `cache`: its sums and the state after its real tokens.
                positions = jnp.zeros(inputs.shape, jnp.int32)  # a recurrent state carries the position
                x, cache = run_layers(self.config, prepared, inputs, cache, positions, lengths)
                return (*sums(logits_at(self.config, prepared, x), targets, mask), cache)

            self._score = score
            self._score_carried = score_carried
            self._row_ways = self.mesh.shape["data"] * self.mesh.shape["fsdp"]
            self._empty_cache = jax.jit(self.config.empty_cache, static_argnums=(0, 1), out_shardings=self._rows)
            self._prepared = None
            self._generators: dict[float, object] = {}

        # ---- lm-eval's interface ----------------------------------------------------------------

        @property
        def eot_token_id(self) -> int:
            return self._eot

        @property
        def prefix_token_id(self) -> int:
            return self.config.bos_token_id if self.config.bos_token_id is not None else self._eot

        @property
        def max_length(self) -> int:
            return self._max_length

        def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
            return self.tokenizer_.encode(string, add_special_tokens=bool(add_special_tokens))

        def tok_decode(self, tokens) -> str:
            return self.tokenizer_.decode(list(tokens))

        @property
        def tokenizer_name(self) -> str:  # lm-eval's cache key for chat-templated requests
            return os.path.abspath(self.pretrained).replace("/", "__")

        def chat_template(self, chat_template: bool | str = False) -> str | None:
            from bridge.checkpoint import tokenizer_dir
            from kept_jax.tokenizer import chat_template as template_of

            if not chat_template:
                return None
            template = template_of(tokenizer_dir(self.pretrained))
            if template is None:
                raise KeptError(f"--apply_chat_template: {self.pretrained} has no chat template in its tokenizer files")
            return template

        def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
            from bridge.checkpoint import tokenizer_dir
            from kept_jax.tokenizer import chat_text

            return chat_text(tokenizer_dir(self.pretrained), chat_history, add_generation_prompt)

        def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
            """Each (context tokens, continuation tokens) scored in one padded window of the last max_length + 1
            tokens; windows of one bucket length go out in batches of batch_size."""
            windows = []
            for _, context, continuation in requests:
                windows.append(window(list(context) + list(continuation), len(continuation), self._window_cap))
            return self.score_windows(windows)

        @property
        def _window_cap(self) -> int | None:
            """How many tokens a scored sequence keeps: max_length, or all of them when the state is carried."""
            return None if self.carry_state else self.max_length

        @property
        def prepared(self):
            """The parameters as the decode engine takes them (one buffer per layer), made once when first needed."""
            from kept_jax.decoding import Generator

            if self._prepared is None:
                self._prepared = Generator.prepare(self.params)
            return self._prepared

        def score_windows(self, windows: list[tuple[list[int], list[int], int]]) -> list[tuple[float, bool]]:
            """(inputs, targets, n) -> (sum of log p over the last n targets, whether each of them is the argmax).
            Sequences longer than max_length (only with carry_state) go to `score_carried`."""
            results: list[tuple[float, bool] | None] = [None] * len(windows)
            long = [i for i, (inputs, _, _) in enumerate(windows) if len(inputs) > self.max_length]
            for i, result in zip(long, self.score_carried([windows[i] for i in long])):
                results[i] = result
            by_bucket: dict[int, list[int]] = {}
            for i, (inputs, _, _) in enumerate(windows):
                if len(inputs) <= self.max_length:
                    by_bucket.setdefault(bucket(len(inputs), self.max_length), []).append(i)
            for width, members in sorted(by_bucket.items()):
                for start in range(0, len(members), self.batch_size_per_gpu):
                    chunk = members[start:start + self.batch_size_per_gpu]
                    inputs, targets, mask, _ = self._pack([windows[i] for i in chunk], width)
                    logp, greedy = self._step("score_rows", inputs, targets, mask)
                    for row, i in enumerate(chunk):
                        results[i] = (float(logp[row]), bool(greedy[row]))
            return results

        def _rows_for(self, n: int) -> int:
            """Rows of a call that holds n windows: batch_size, halved while the half still holds them and still
            splits over data x fsdp, so the last, smaller call of a length is cheaper and the shapes stay few."""
            rows = self.batch_size_per_gpu
            while rows % 2 == 0 and rows // 2 >= n and (rows // 2) % self._row_ways == 0:
                rows //= 2
            return rows

        def _pack(self, windows: list[tuple[list[int], list[int], int]], width: int):
            """`_rows_for` rows of `width` tokens (inputs, targets, mask of the scored targets, lengths),
            right-padded; rows beyond the windows are padding too."""
            rows = self._rows_for(len(windows))
            inputs = np.full((rows, width), self._eot, np.int32)
            targets = np.zeros((rows, width), np.int32)
            mask = np.zeros((rows, width), np.float32)
            lengths = np.zeros(rows, np.int32)
            for row, (x, y, n) in enumerate(windows):
                inputs[row, :len(x)], targets[row, :len(y)], lengths[row] = x, y, len(x)
                mask[row, len(y) - n:len(y)] = 1.0
            return inputs, targets, mask, lengths

        def score_carried(self, windows: list[tuple[list[int], list[int], int]]) -> list[tuple[float, bool]]:
            """Like `score_windows` for a Llamba's sequences of any length: batch_size rows at a time, each run in
            windows of max_length tokens (the last one bucketed) that carry the recurrent state; longest first, so
            that a batch's rows have similar lengths."""
            results: list[tuple[float, bool] | None] = [None] * len(windows)
            order = sorted(range(len(windows)), key=lambda i: -len(windows[i][0]))
            for start in range(0, len(order), self.batch_size_per_gpu):
                chunk = order[start:start + self.batch_size_per_gpu]
                packed = self._pack([windows[i] for i in chunk], len(windows[chunk[0]][0]))
                logp, greedy = self._step("score_carried_rows", *packed)
                for row, i in enumerate(chunk):
                    results[i] = (float(logp[row]), bool(greedy[row]))
            return results

        def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
            from lm_eval import utils

            windows, owners = [], []
            for index, request in enumerate(requests):
                (text,) = request.args
                tokens = self.tok_encode(text)
                if self.carry_state:  # the whole document, scored after the prefix token
                    windows.append(window([self.prefix_token_id, *tokens], len(tokens), None))
                    owners.append(index)
                    continue
                for context, continuation in map(utils.make_disjoint_window, utils.get_rolling_token_windows(
                        token_list=tokens, prefix_token=self.prefix_token_id,
                        max_seq_len=self.max_length, context_len=1)):
                    windows.append(window(list(context) + list(continuation), len(continuation), self.max_length))
                    owners.append(index)
            totals = [0.0] * len(requests)
            for owner, (logp, _) in zip(owners, self.score_windows(windows)):
                totals[owner] += logp
            return totals

        def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
            out: list[str | None] = [None] * len(requests)
            groups: dict[tuple, list[int]] = {}
            for i, request in enumerate(requests):
                _, kwargs = request.args
                until, max_new, temperature = self._generation_kwargs(kwargs)
                groups.setdefault((tuple(until), max_new, temperature), []).append(i)
            for (until, max_new, temperature), members in groups.items():
                for start in range(0, len(members), self.batch_size_per_gpu):
                    chunk = members[start:start + self.batch_size_per_gpu]
                    # A Llamba carrying its state prefills the whole prompt; otherwise prompt and completion fit
                    # in max_length.
                    budget = None if self.carry_state else self.max_length - max_new
                    prompts = [self.tok_encode(requests[i].args[0]) for i in chunk]
                    prompts = prompts if budget is None else [p[-budget:] for p in prompts]
                    rows = prompts + [prompts[0]] * (self._rows_for(len(prompts)) - len(prompts))  # few shapes
                    padded = np.full((len(rows), bucket(max(map(len, rows)), budget)), self._eot, np.int32)
                    for row, prompt in zip(padded, rows):
                        row[:len(prompt)] = prompt
                    generated = self._step("generate_rows", padded, np.asarray(list(map(len, rows)), np.int32),
                                        np.asarray(max_new, np.int32), np.asarray(temperature, np.float32))
                    for i, tokens in zip(chunk, generated):
                        text = self.tok_decode([t for t in tokens if t not in self._eos_ids])
                        out[i] = cut_at_stops(text, until)
            return out

        # ---- the steps every process runs (kept_jax.lockstep): numpy arrays in, numpy out -------------------

        STEPS = ("score_rows", "score_carried_rows", "generate_rows")

        def _step(self, name: str, *arrays: np.ndarray):
            """Runs step `name` here, and on every other process when there are several (this one leads)."""
            from kept_jax import lockstep

            lockstep.lead(name, *arrays)
            return getattr(self, name)(*arrays)

        def serve(self) -> None:
            """On a following process: run the leader's steps until it releases the followers."""
            from kept_jax import lockstep

            lockstep.follow({name: getattr(self, name) for name in self.STEPS})

        def _place(self, *arrays: np.ndarray):
            from kept_jax import sharding

            return [sharding.global_rows(a, self._rows) for a in arrays]

        def score_rows(self, inputs, targets, mask) -> tuple[np.ndarray, np.ndarray]:
            """[rows, T] right-padded windows -> each row's sum of log p over the masked targets, and whether each
            masked target is the argmax."""
            return jax.device_get(self._score(self.params, *self._place(inputs, targets, mask)))

        def score_carried_rows(self, inputs, targets, mask, lengths) -> tuple[np.ndarray, np.ndarray]:
            """`score_rows` for rows of any length (`lengths` real tokens each): windows of max_length tokens (the
            last one bucketed), each following the recurrent state the previous one left."""
            total, width = inputs.shape[1], self.max_length
            cache = self._empty_cache(len(inputs), width)
            logp, greedy = np.zeros(len(inputs)), np.ones(len(inputs), bool)
            for begin in range(0, total, width):
                size = bucket(total - begin, width)
                part = (slice(None), slice(begin, begin + size))
                padded = [np.pad(a[part], ((0, 0), (0, size - a[part].shape[1]))) for a in (inputs, targets, mask)]
                real = np.clip(lengths - begin, 0, size).astype(np.int32)
                part_logp, part_greedy, cache = self._score_carried(self.prepared, cache, *self._place(*padded, real))
                part_logp, part_greedy = jax.device_get((part_logp, part_greedy))
                logp, greedy = logp + part_logp, greedy & part_greedy
            return logp, greedy

        def generate_rows(self, prompts, lengths, max_new, temperature) -> list[list[int]]:
            """Right-padded prompts [rows, T] with `lengths` -> each row's generated ids (the decode engine)."""
            from kept_jax.decoding import Generator, Sampling

            temperature = float(temperature)
            if temperature not in self._generators:
                self._generators[temperature] = Generator(self.config, Sampling(temperature=temperature),
                                                          eos_ids=self._eos_ids)
            rows = [list(row[:n]) for row, n in zip(prompts.tolist(), lengths.tolist())]
            return self._generators[temperature].generate(self.prepared, rows, int(max_new),
                                                          prompt_length=prompts.shape[1]).tokens

        def _generation_kwargs(self, kwargs: dict) -> tuple[list[str], int, float]:
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            do_sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 0.0)) if do_sample else 0.0
            if max_new >= self.max_length and not self.carry_state:
                raise KeptError(f"max_gen_toks={max_new} leaves no room for a prompt in max_length={self.max_length}")
            return until, max_new, temperature

    return KeptJaxLM


def task_manager(tasks: Iterable[str]):
    """lm-eval's task index for these tasks: kept_jax's offline tasks alone when they are all that is asked (indexing
    lm-eval's own thousands of task files takes 10-20 s here), else lm-eval's and kept_jax's."""
    from lm_eval.tasks import TaskManager

    offline = TaskManager(include_path=TASKS_DIR, include_defaults=False)
    if set(tasks) <= set(offline.all_tasks):
        return offline
    return TaskManager(include_path=TASKS_DIR)


def cut_at_stops(text: str, stops: Iterable[str]) -> str:
    """`text` up to the first occurrence of any stop sequence."""
    cut = len(text)
    for stop in stops:
        if stop and (at := text.find(stop)) != -1:
            cut = min(cut, at)
    return text[:cut]


KeptJaxLM = None
try:  # registered when lm-eval is installed (pip install 'kept_jax[eval]')
    KeptJaxLM = _make_class()
except ImportError:
    pass


def on_every_host(simple_evaluate: Callable) -> Callable:
    """lm-eval's `simple_evaluate` for a run of several processes: the first process evaluates, then releases the
    others; they build the same model (the same arguments) and run the steps it sends meanwhile, then return None,
    as lm-eval's own other ranks do. With one process, `simple_evaluate` itself."""
    import jax

    if jax.process_count() == 1:
        return simple_evaluate

    @functools.wraps(simple_evaluate)
    def run(model, model_args=None, *args, batch_size=None, max_batch_size=None, device=None, **kwargs):
        from kept_jax import lockstep

        if model != "kept_jax" and not isinstance(model, KeptJaxLM):  # every process refuses, the first one too
            raise KeptError(f"--model {model}: runs of several processes evaluate only --model kept_jax")
        if lockstep.is_leader():
            try:
                return simple_evaluate(model, model_args, *args, batch_size=batch_size, max_batch_size=max_batch_size,
                                       device=device, **kwargs)
            finally:
                lockstep.release()
        if not isinstance(model, KeptJaxLM):
            make = KeptJaxLM.create_from_arg_obj if isinstance(model_args, dict) else KeptJaxLM.create_from_arg_string
            model = make(model_args or {}, {"batch_size": batch_size, "max_batch_size": max_batch_size,
                                            "device": device})
        model.serve()
        return None

    return run


def check_model_args(given: dict) -> None:
    """kept_jax's model arguments as lm-eval hands them over: a checkpoint named, every argument known, a dtype it
    takes (the class checks them, and `run` before lm-eval starts)."""
    if given.get("pretrained") is None:
        raise KeptError("--model kept_jax needs the checkpoint: --model_args pretrained=PATH (a Hugging Face "
                        "directory or a GGUF file)")
    unknown = sorted(k for k in given if k not in MODEL_ARGS)
    if unknown:
        raise KeptError(f"kept_jax's lm-eval model does not take {', '.join(unknown)}; its arguments are "
                        f"{', '.join(MODEL_ARGS)}")
    if given.get("dtype", DTYPES[0]) not in DTYPES:
        raise KeptError(f"dtype={given['dtype']!r}: choose one of {', '.join(DTYPES)}")


def check_run_args(args: list[str]) -> None:
    """What lm-eval's `run` would fail on late, or not at all, refused before it starts: kept_jax's model without
    `pretrained=`, with a checkpoint that does not open, a dtype it does not take or an argument it does not know,
    `--limit` below 1 document (a fraction must be above 0), an `--output_path` that cannot be written (lm-eval
    warns, and the results are lost)."""
    import argparse
    import json

    from kept_jax.fileio import check_location

    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--model", default="hf")
    p.add_argument("--model_args", default="")
    p.add_argument("--limit", "-L")
    p.add_argument("--output_path", "-o")
    known, _ = p.parse_known_args(args)
    if known.model == "kept_jax":
        text = known.model_args.strip()
        if text.startswith("{"):
            try:
                given = json.loads(text)
            except json.JSONDecodeError as e:
                raise KeptError(f"--model_args is not valid JSON ({e.msg}); write pretrained=PATH,dtype=...") from None
        else:
            given = dict(part.split("=", 1) if "=" in part else (part, None) for part in text.split(",") if part)
        check_model_args(given)
        from bridge.checkpoint import check_checkpoint

        check_checkpoint(str(given["pretrained"]))  # a missing or damaged checkpoint, before lm-eval logs a line
    if known.limit is not None:
        try:
            limit = float(known.limit)
        except ValueError:
            limit = None
        if limit is None or not limit > 0:
            raise KeptError(f"--limit {known.limit}: give a positive number of documents per task (or a fraction "
                            "of them, between 0 and 1)")
    if known.output_path:
        out = os.path.abspath(known.output_path)
        check_location(os.path.dirname(out) if os.path.isfile(out) else out)


@cli_entry
def main(argv=None) -> int:
    """lm-eval's command line with kept_jax registered (and, for `run`, the offline tasks on the include path)."""
    if KeptJaxLM is None:
        raise KeptError("lm-eval is not installed: pip install 'kept_jax[eval]'")
    import lm_eval
    from lm_eval.__main__ import cli_evaluate

    from kept_jax import sharding

    sharding.initialize_distributed()  # several processes: the first runs lm-eval, the others follow it
    lm_eval.simple_evaluate = on_every_host(lm_eval.simple_evaluate)
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["run"]:
        check_run_args(args[1:])
        if "--include_path" not in args:
            args += ["--include_path", TASKS_DIR]
    sys.argv = ["lm_eval", *args]
    try:
        return cli_evaluate() or 0
    except ValueError as e:  # lm-eval's word for a task it does not know
        if "Tasks not found" in str(e):
            raise KeptError(f"{e}; `python -m kept_jax.harness ls tasks` lists them (the offline ones: "
                            "kept_heldout, kept_next_line)") from None
        raise


if __name__ == "__main__":
    sys.exit(main())
