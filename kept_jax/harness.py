"""kept_jax as an lm-evaluation-harness model: `--model kept_jax` for Orion, Llama and Llamba checkpoints
(Hugging Face directories and GGUF files), in JAX.

    python -m kept_jax.harness run --model kept_jax --model_args pretrained=DIR,dtype=bfloat16 --batch_size 16 \\
        --tasks TASKS          # lm-eval's own command line, with kept_jax registered and the offline tasks found

lm-eval 0.4.13 discovers models only among its own modules, so `python -m kept_jax.harness` registers this class and
hands the rest of the command line to lm-eval's CLI unchanged (`import kept_jax.harness` does the same for its Python
API, `lm_eval.simple_evaluate(model="kept_jax", ...)`).

Static shapes, so that XLA compiles a bounded number of programs: every scored sequence is right-padded to the next
power of two (at least 32, at most `max_length`) and every batch to `batch_size` rows; a causal model's outputs at a
position do not depend on what follows it, so the padding changes nothing that is read. `loglikelihood_rolling`
cuts a document into `max_length` windows as lm-eval's own models do; `generate_until` runs kept_jax's decode engine
(greedy, or sampled with the request's temperature) on prompts padded the same way and cuts each completion at the
first stop sequence.

A Llamba has no context limit, only a state: with `carry_state=True` a sequence longer than `max_length` runs in
windows of `max_length` tokens that carry each layer's recurrent state (convolution window and SSM state) from one to
the next, so every token is scored on everything before it (lm-eval's rolling windows restart from nothing instead,
as a Transformer's must). The default keeps lm-eval's windows, so a Llamba and its Llama teacher are scored alike.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterable

import numpy as np

from kept_jax.errors import KeptError, cli_entry

TASKS_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", "lm_eval_tasks")  # offline tasks
MIN_BUCKET = 32
DTYPES = ("float32", "bfloat16")


def bucket(length: int, max_length: int) -> int:
    """The padded length of a sequence: the next power of two, at least MIN_BUCKET, at most max_length."""
    size = MIN_BUCKET
    while size < length:
        size *= 2
    return min(size, max_length)


def window(tokens: list[int], scored: int, max_length: int | None) -> tuple[list[int], list[int], int]:
    """(inputs, targets, how many of the last targets are scored) of the last max_length + 1 tokens (all of them
    when max_length is None)."""
    tokens = tokens if max_length is None else tokens[-(max_length + 1):]
    return tokens[:-1], tokens[1:], scored


def _make_class():
    import jax
    import jax.numpy as jnp
    import lm_eval.models  # noqa: F401  lm-eval's own models first: it imports them only into an empty registry
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model

    @register_model("kept_jax")
    class KeptJaxLM(TemplateLM):
        """`pretrained`: a checkpoint kept_jax reads; `dtype`: float32 or bfloat16; `batch_size`: rows per call;
        `max_length`: tokens per scored window (default: the model's context, 2048 for a Llamba, which has none);
        `carry_state` (Llamba only): score longer sequences whole, window after window, carrying the state."""

        def __init__(self, pretrained: str, dtype: str = "float32", batch_size: int | str = 8,
                     max_length: int | None = None, max_gen_toks: int = 256, carry_state: bool = False,
                     max_batch_size: int | None = None, device: str | None = None, **unused):
            # lm-eval passes its --batch_size, --max_batch_size and --device to every model; JAX places the
            # model on its default backend, so `device` and `max_batch_size` have nothing to choose.
            super().__init__()
            from bridge.checkpoint import load_checkpoint, load_checkpoint_tokenizer
            from kept_jax.decoding import logits_at, run_layers
            from kept_jax.models import build_model

            if unused:
                raise KeptError(f"kept_jax's lm-eval model does not take {', '.join(sorted(unused))}; its arguments "
                                "are pretrained, dtype, batch_size, max_length, max_gen_toks, carry_state")
            if dtype not in DTYPES:
                raise KeptError(f"dtype={dtype!r}: choose one of {', '.join(DTYPES)}")
            if str(batch_size) == "auto" or int(batch_size) < 1:
                raise KeptError(f"batch_size={batch_size!r}: give a positive number of rows (no 'auto')")
            self.config, params, _ = load_checkpoint(pretrained, compute_dtype=dtype, param_dtype=dtype)
            context = self.config.max_position_embeddings or 2048
            self._max_length = int(max_length or context)
            if self.config.max_position_embeddings and self._max_length > self.config.max_position_embeddings:
                raise KeptError(f"max_length={self._max_length} is beyond the model's context of "
                                f"{self.config.max_position_embeddings} tokens; give at most that")
            if carry_state and self.config.architecture != "llamba":
                raise KeptError(f"carry_state=True: a {self.config.architecture} has no recurrent state to carry "
                                "(only a Llamba does); leave carry_state out")
            self.carry_state = bool(carry_state)
            self.batch_size_per_gpu = int(batch_size)
            self.max_gen_toks = int(max_gen_toks)
            self.params = params
            self.tokenizer_ = load_checkpoint_tokenizer(pretrained, self.config.architecture,
                                                        "lm-eval scores text: give a checkpoint with tokenizer files")
            self.pretrained = pretrained
            eos = self.config.eos_token_id
            self._eot = int(eos[0] if isinstance(eos, (list, tuple)) else eos if eos is not None else 0)
            self._eos_ids = tuple(eos) if isinstance(eos, (list, tuple)) else (self._eot,)
            vocab = self.config.vocab_size
            model = build_model(self.config)

            @jax.jit
            def score(params, inputs, targets, mask):
                logits = model.apply({"params": params}, inputs)[..., :vocab].astype(jnp.float32)
                logp = jax.nn.log_softmax(logits, -1)
                picked = jnp.take_along_axis(logp, targets[..., None], -1)[..., 0]
                greedy = jnp.argmax(logits, -1) == targets
                return jnp.sum(picked * mask, -1), jnp.all(greedy | (mask == 0), -1)

            @jax.jit
            def score_carried(prepared, cache, inputs, targets, mask, lengths):
                # One window of a longer sequence, following `cache`: its sums and the state after its real tokens.
                positions = jnp.zeros(inputs.shape, jnp.int32)  # a Llamba's state carries the position
                x, cache = run_layers(self.config, prepared, inputs, cache, positions, lengths)
                logits = logits_at(self.config, prepared, x).astype(jnp.float32)
                picked = jnp.take_along_axis(jax.nn.log_softmax(logits, -1), targets[..., None], -1)[..., 0]
                greedy = jnp.argmax(logits, -1) == targets
                return jnp.sum(picked * mask, -1), jnp.all(greedy | (mask == 0), -1), cache

            self._score = score
            self._score_carried = score_carried
            self._prepared = None

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
            rows = self.batch_size_per_gpu
            for width, members in sorted(by_bucket.items()):
                for start in range(0, len(members), rows):
                    chunk = members[start:start + rows]
                    inputs = np.full((rows, width), self._eot, np.int32)
                    targets = np.zeros((rows, width), np.int32)
                    mask = np.zeros((rows, width), np.float32)
                    for row, i in enumerate(chunk):
                        x, y, n = windows[i]
                        inputs[row, :len(x)], targets[row, :len(y)] = x, y
                        mask[row, len(y) - n:len(y)] = 1.0
                    logp, greedy = jax.device_get(self._score(self.params, inputs, targets, mask))
                    for row, i in enumerate(chunk):
                        results[i] = (float(logp[row]), bool(greedy[row]))
            return results

        def score_carried(self, windows: list[tuple[list[int], list[int], int]]) -> list[tuple[float, bool]]:
            """Like `score_windows` for a Llamba's sequences of any length: batch_size rows at a time, each run in
            windows of max_length tokens (the last one bucketed) that carry the recurrent state; longest first, so
            that a batch's rows have similar lengths."""
            results: list[tuple[float, bool] | None] = [None] * len(windows)
            order = sorted(range(len(windows)), key=lambda i: -len(windows[i][0]))
            rows, width = self.batch_size_per_gpu, self.max_length
            for start in range(0, len(order), rows):
                chunk = order[start:start + rows]
                total = len(windows[chunk[0]][0])
                inputs = np.full((rows, total), self._eot, np.int32)
                targets = np.zeros((rows, total), np.int32)
                mask = np.zeros((rows, total), np.float32)
                lengths = np.zeros(rows, np.int32)
                for row, i in enumerate(chunk):
                    x, y, n = windows[i]
                    inputs[row, :len(x)], targets[row, :len(y)], lengths[row] = x, y, len(x)
                    mask[row, len(y) - n:len(y)] = 1.0
                cache = self.config.empty_cache(rows, width)
                logp, greedy = np.zeros(rows), np.ones(rows, bool)
                for begin in range(0, total, width):
                    size = bucket(total - begin, width)
                    part = (slice(None), slice(begin, begin + size))
                    padded = [np.pad(a[part], ((0, 0), (0, size - a[part].shape[1]))) for a in (inputs, targets, mask)]
                    real = np.clip(lengths - begin, 0, size).astype(np.int32)
                    part_logp, part_greedy, cache = self._score_carried(self.prepared, cache, *padded, real)
                    part_logp, part_greedy = jax.device_get((part_logp, part_greedy))
                    logp, greedy = logp + part_logp, greedy & part_greedy
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
            from kept_jax.decoding import Generator, Sampling

            out: list[str | None] = [None] * len(requests)
            groups: dict[tuple, list[int]] = {}
            for i, request in enumerate(requests):
                _, kwargs = request.args
                until, max_new, temperature = self._generation_kwargs(kwargs)
                groups.setdefault((tuple(until), max_new, temperature), []).append(i)
            prepared = self.prepared
            for (until, max_new, temperature), members in groups.items():
                generator = Generator(self.config, Sampling(temperature=temperature), eos_ids=self._eos_ids)
                for start in range(0, len(members), self.batch_size_per_gpu):
                    chunk = members[start:start + self.batch_size_per_gpu]
                    budget = self.max_length - max_new
                    prompts = [self.tok_encode(requests[i].args[0])[-budget:] for i in chunk]
                    width = bucket(max(len(p) for p in prompts), budget)
                    rows = prompts + [prompts[0]] * (self.batch_size_per_gpu - len(prompts))  # a fixed batch
                    generation = generator.generate(prepared, rows, max_new, prompt_length=width)
                    for i, tokens in zip(chunk, generation.tokens):
                        text = self.tok_decode([t for t in tokens if t not in self._eos_ids])
                        out[i] = cut_at_stops(text, until)
            return out

        def _generation_kwargs(self, kwargs: dict) -> tuple[list[str], int, float]:
            kwargs = dict(kwargs or {})
            until = kwargs.pop("until", None) or []
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(kwargs.pop("max_gen_toks", self.max_gen_toks))
            do_sample = bool(kwargs.pop("do_sample", False))
            temperature = float(kwargs.pop("temperature", 0.0)) if do_sample else 0.0
            if max_new >= self.max_length:
                raise KeptError(f"max_gen_toks={max_new} leaves no room for a prompt in max_length={self.max_length}")
            return until, max_new, temperature

    return KeptJaxLM


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


@cli_entry
def main(argv=None) -> int:
    """lm-eval's command line with kept_jax registered (and, for `run`, the offline tasks on the include path)."""
    if KeptJaxLM is None:
        raise KeptError("lm-eval is not installed: pip install 'kept_jax[eval]'")
    from lm_eval.__main__ import cli_evaluate

    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["run"] and "--include_path" not in args:
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
