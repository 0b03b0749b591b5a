"""Generation for every architecture: one prefill, then a jitted decode loop with static shapes.

    generator = Generator(config, Sampling(temperature=0.7, top_p=0.9), eos_ids=(2,))
    result = generator.generate(params, [[1, 5, 9], [1, 7]], max_new_tokens=32, key=jax.random.key(0))

Prompts of different lengths are right-padded into one [b, T] batch. The prefill runs the layers over it once,
each layer's `extend` filling its entry of `config.empty_cache(b, L)`: Llama and Orion write keys and values into a
preallocated KV cache of L positions (the padding's entries are masked, then overwritten); Llamba runs the chunked
form, where padding has no input and decay 1, so each row's state is the state after its own prompt. Each row's
first token comes from the logits at its last real position. Decoding is one `lax.while_loop` of one-token steps
until every row has produced an end-of-sequence token or `max_new` tokens; `advance(state, steps)` runs at most
`steps` of them, so that a caller can stream text between calls of the same compiled loop.

A KV cache grows as decoding goes, so that a step's cost follows the tokens so far and not `max_new` (every step
attends over the whole cache): its lengths are `cache_lengths(T, max_new)`, powers of two from 256 up to T + max_new.
The loop also stops when a row still going has filled the cache; `generate` then copies the cache into the next
length (`grow`) and goes on with the loop compiled for it: at most log2(max_new / 256) + 1 compilations, each only
when a generation gets that far. A recurrent state has one size whatever the length, and one length.

Sampling follows Transformers' logits processors, in their order: temperature, then top-k, then top-p (the smallest
set of most likely tokens whose probability reaches p; at least one), then a categorical draw with an explicit PRNG
key. Temperature 0 is greedy (argmax). A Llamba vocabulary padded past `vocab_size` is never sampled.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from typing import Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from kept_jax.config import ModelConfig
from kept_jax.errors import KeptError
from kept_jax.models import build_model, layer_list, unstack_layers
from kept_jax.sharding import to_host

Array = jax.Array

FIRST_CACHE_LENGTH = 256  # positions of the shortest KV cache a generation starts with; each next one is twice as long


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen: temperature 0 is greedy; top_k 0 and top_p 1 are off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self):
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise KeptError(f"temperature must be a finite number >= 0 (0 is greedy), got {self.temperature!r}")
        if not (isinstance(self.top_k, int) and self.top_k >= 0):
            raise KeptError(f"top-k must be an integer >= 0 (0 is off), got {self.top_k!r}")
        if not (0 < self.top_p <= 1):
            raise KeptError(f"top-p must be in (0, 1] (1 is off), got {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def filter_logits(logits: Array, sampling: Sampling) -> Array:
    """fp32 logits [..., V] scaled by the temperature, -inf outside the top-k and the top-p set."""
    logits = logits.astype(jnp.float32) / sampling.temperature
    if sampling.top_k and sampling.top_k < logits.shape[-1]:
        kth = jax.lax.top_k(logits, sampling.top_k)[0][..., -1:]
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    if sampling.top_p < 1:
        ordered = jnp.sort(logits, axis=-1)[..., ::-1]
        probs = jax.nn.softmax(ordered, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # the mass of the tokens more likely than each
        kept = jnp.where(before < sampling.top_p, ordered, jnp.inf)  # the first token is always kept
        logits = jnp.where(logits < jnp.min(kept, axis=-1, keepdims=True), -jnp.inf, logits)
    return logits


def sample(logits: Array, key: Array, sampling: Sampling) -> Array:
    """int32 token ids [...] from logits [..., V]."""
    if sampling.greedy:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    return jax.random.categorical(key, filter_logits(logits, sampling), axis=-1).astype(jnp.int32)


class DecodeState(NamedTuple):
    """What the decode loop carries: everything has a static shape."""

    cache: tuple  # each layer's KV cache or recurrent state
    tokens: Array  # [b, max_new] int32: the generated ids, pad after a row's end
    positions: Array  # [b] int32: where each row's next token goes (its length so far)
    done: Array  # [b] bool: the row has produced an end-of-sequence token
    count: Array  # int32: tokens generated per row so far
    key: Array


def run_layers(config: ModelConfig, params, tokens: Array, cache: tuple, positions: Array,
               lengths: Array) -> tuple[Array, tuple]:
    """The model on `tokens` [b, T] at `positions` [b, T] following `cache`: what leaves the last layer [b, T, d]
    and the updated cache. `lengths` [b]: each row's real tokens among the T (a right-padded prefill)."""
    model = build_model(config)
    x = model.apply({"params": params}, tokens, method="embed")
    new_cache = []
    for block, layer, layer_cache in zip(config.block_classes, layer_list(params), cache):
        x, layer_cache = block(config).apply({"params": layer}, x, layer_cache, positions, lengths, method="extend")
        new_cache.append(layer_cache)
    return x, tuple(new_cache)


def cache_axis(config: ModelConfig) -> tuple[int, int] | None:
    """Where a generation state's length lies: (leaf, axis) of the first leaf of `config.empty_cache` whose size
    follows the positions it holds (a KV cache's), or None when none does (a recurrent state)."""
    one, two = (jax.tree.leaves(jax.eval_shape(functools.partial(config.empty_cache, 1, n))) for n in (1, 2))
    for leaf, (a, b) in enumerate(zip(one, two)):
        for axis, (x, y) in enumerate(zip(a.shape, b.shape)):
            if x != y:
                return leaf, axis
    return None


def grow_cache(config: ModelConfig, cache: tuple, batch: int, length: int) -> tuple:
    """`cache` copied into one of `length` positions, zeros after what it held (masked until written)."""
    target = jax.eval_shape(functools.partial(config.empty_cache, batch, length))
    return jax.tree.map(lambda x, t: jnp.pad(x, [(0, n - o) for o, n in zip(x.shape, t.shape)]), cache, target)


def _abstract(tree):
    """Shapes, dtypes and placements of arrays (or of abstract values), for lowering a program on them."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=getattr(x, "sharding", None)), tree)


def _placed(shapes, shardings):
    """Abstract values of `shapes` placed by `shardings` (a compiled program's outputs, where the next one takes
    them)."""
    return jax.tree.map(lambda s, placed: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=placed), shapes, shardings)


def logits_at(config: ModelConfig, params, x: Array) -> Array:
    """fp32 logits over the real vocabulary (a padded one is cut) for what leaves the last layer."""
    return build_model(config).apply({"params": params}, x, method="head")[..., : config.vocab_size]


@dataclasses.dataclass
class Generation:
    """Generated ids per row (each ends at its end-of-sequence token, included, or at max_new), whether it ended
    there, and the wall time until the first token and from then to the last, compilation excluded."""

    tokens: list[list[int]]
    stopped_at_eos: list[bool]
    prefill_s: float = 0.0
    decode_s: float = 0.0


class Generator:
    """Prefill and decode loop for one model config and sampling rule: the prefill compiled once per (batch, prompt
    length, max_new), the loop once per (batch, max_new, cache length). Parameters are arguments, never baked in; a
    stacked (scanned) tree is unstacked by `prepare`."""

    def __init__(self, config: ModelConfig, sampling: Sampling = Sampling(), eos_ids: Sequence[int] = (),
                 pad_id: int | None = None, first_cache_length: int | None = FIRST_CACHE_LENGTH):
        self.config = config
        if first_cache_length is not None and first_cache_length < 1:
            raise ValueError(f"first_cache_length must be at least 1 (or None), got {first_cache_length}")
        self.first_cache_length = first_cache_length  # None: the cache holds prompt + max_new from the start
        self.sampling = sampling
        self.eos_ids = tuple(int(i) for i in eos_ids)
        self.pad_id = int(pad_id if pad_id is not None else (self.eos_ids[0] if self.eos_ids else 0))
        self._length_at = cache_axis(config)
        self._starts: dict[tuple[int, int, int], tuple[Callable, Callable]] = {}  # prefill and first loop
        self._loops: dict[tuple[int, int, int | None], Callable] = {}  # by (batch, max_new, cache length)
        self._grows: dict[tuple[int, int, int], tuple[Callable, Callable]] = {}  # copy into a longer cache, its loop

    @staticmethod
    def prepare(params):
        """Each layer's parameters as their own buffers (`model/layers/<i>`), so that no step slices a stack."""
        return unstack_layers(params)

    def cache_lengths(self, prompt_length: int, max_new: int) -> tuple[int, ...]:
        """The cache lengths a generation goes through: the first cache length doubled until it leaves room for the
        prompt and one token, and on while it is shorter than prompt + max_new, then prompt + max_new (the only one
        for a recurrent state, or without a first cache length)."""
        total = prompt_length + max_new
        if self._length_at is None or self.first_cache_length is None:
            return (total,)
        length = self.first_cache_length
        while length <= prompt_length:
            length *= 2
        lengths = []
        while length < total:
            lengths.append(length)
            length *= 2
        return (*lengths, total)

    def cache_length(self, cache: tuple) -> int | None:
        """The positions `cache` has room for (None for a recurrent state)."""
        return None if self._length_at is None else jax.tree.leaves(cache)[self._length_at[0]].shape[self._length_at[1]]

    def _is_eos(self, tokens: Array) -> Array:
        return jnp.isin(tokens, jnp.asarray(self.eos_ids, jnp.int32)) if self.eos_ids else jnp.zeros_like(tokens, bool)

    def start(self, params, prompts: Array, lengths: Array, key: Array, max_new: int, length: int) -> DecodeState:
        """The prefill (pure; `compile` jits it): prompts [b, T] right-padded, lengths [b] -> the first token's
        state, with a cache of `length` positions (> T)."""
        b, t = prompts.shape
        cache = self.config.empty_cache(b, length)
        positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
        x, cache = run_layers(self.config, params, prompts, cache, positions, lengths)
        last = jnp.take_along_axis(x, (lengths - 1)[:, None, None], axis=1)  # [b, 1, d]
        key, draw = jax.random.split(key)
        first = sample(logits_at(self.config, params, last)[:, 0], draw, self.sampling)
        tokens = jnp.full((b, max_new), self.pad_id, jnp.int32).at[:, 0].set(first)
        return DecodeState(cache, tokens, lengths.astype(jnp.int32), self._is_eos(first), jnp.int32(1), key)

    def advance(self, params, state: DecodeState, steps: Array) -> DecodeState:
        """At most `steps` decode steps (pure; `compile` jits it, the state donated): a `lax.while_loop` that also
        stops when every row is done, when max_new tokens are generated, or when a row still going has filled the
        cache (`grow` makes room). A row that is done stays where it ended."""
        max_new = state.tokens.shape[1]
        stop = jnp.minimum(state.count + steps, max_new)
        length = self.cache_length(state.cache)

        def going(s: DecodeState) -> Array:
            room = True if length is None else jnp.all(s.done | (s.positions < length))
            return (s.count < stop) & ~jnp.all(s.done) & room

        def step(s: DecodeState) -> DecodeState:
            previous = jax.lax.dynamic_index_in_dim(s.tokens, s.count - 1, axis=1, keepdims=True)  # [b, 1]
            lengths = jnp.ones_like(s.positions)
            x, cache = run_layers(self.config, params, previous, s.cache, s.positions[:, None], lengths)
            key, draw = jax.random.split(s.key)
            token = sample(logits_at(self.config, params, x)[:, 0], draw, self.sampling)
            token = jnp.where(s.done, self.pad_id, token)
            tokens = jax.lax.dynamic_update_index_in_dim(s.tokens, token[:, None], s.count, axis=1)
            positions = s.positions + (~s.done).astype(jnp.int32)
            return DecodeState(cache, tokens, positions, s.done | self._is_eos(token), s.count + 1, key)

        return jax.lax.while_loop(going, step, state)

    def grow(self, state: DecodeState, length: int) -> DecodeState:
        """The state with its cache copied into one of `length` positions (pure; `_grown` jits it)."""
        return state._replace(cache=grow_cache(self.config, state.cache, state.tokens.shape[0], length))

    def _loop(self, params, state) -> Callable:
        """The decode loop compiled for the (abstract) state's shapes and placement, once per batch, max_new and
        cache length."""
        shapes = (*state.tokens.shape, self.cache_length(state.cache))
        if shapes not in self._loops:
            self._loops[shapes] = jax.jit(self.advance, donate_argnums=1).lower(
                _abstract(params), _abstract(state), jnp.int32(0)).compile()
        return self._loops[shapes]

    def _grown(self, params, state: DecodeState, length: int) -> tuple[DecodeState, Callable]:
        """The state in a cache of `length` positions and the loop compiled for it."""
        shapes = (*state.tokens.shape, length)
        if shapes not in self._grows:
            grow = jax.jit(self.grow, static_argnums=1).lower(_abstract(state), length).compile()
            grown = _placed(jax.eval_shape(functools.partial(self.grow, length=length), _abstract(state)),
                            grow.output_shardings)
            self._grows[shapes] = (grow, self._loop(params, grown))
        grow, loop = self._grows[shapes]
        return grow(state), loop

    def compile(self, params, batch: int, prompt_length: int, max_new: int) -> tuple[Callable, Callable]:
        """The compiled prefill `(params, prompts, lengths, key) -> state` and decode loop
        `(params, state, steps) -> state` for these shapes and the first of their cache lengths (compiled once, then
        reused; placed parameters, on a mesh, compile for their placement)."""
        if max_new < 1:
            raise KeptError(f"max_new_tokens must be at least 1, got {max_new}")
        shapes = (batch, prompt_length, max_new)
        if shapes not in self._starts:
            abstract = _abstract(params)
            args = (abstract, jax.ShapeDtypeStruct((batch, prompt_length), jnp.int32),
                    jax.ShapeDtypeStruct((batch,), jnp.int32), jax.eval_shape(lambda: jax.random.key(0)))
            length = self.cache_lengths(prompt_length, max_new)[0]
            start = jax.jit(self.start, static_argnums=(4, 5)).lower(*args, max_new, length).compile()
            state = _placed(jax.eval_shape(functools.partial(self.start, max_new=max_new, length=length), *args),
                            start.output_shardings)  # the loop takes the state where the prefill leaves it
            self._starts[shapes] = (start, self._loop(abstract, state))
        return self._starts[shapes]

    def generate(self, params, prompts: Sequence[Sequence[int]], max_new_tokens: int, key: Array | None = None,
                 prompt_length: int | None = None, steps_per_call: int | None = None,
                 on_step: Callable[[np.ndarray, int], None] | None = None) -> Generation:
        """Generates for a batch of prompts (token ids, each non-empty). `prompt_length` pads the batch to a fixed
        length (one compilation for many batches). `on_step(tokens, count)` is called after the prefill and after
        every `steps_per_call` decode steps (default: all of them in one call) with the ids so far on the host
        ([b, max_new], the first `count` of each row generated), e.g. to stream text: the same compiled loop runs
        each time, and nothing is compiled per token. The times are what a caller waits, `on_step` included: the
        prefill until the first token has been handed over, then the decoding until the last."""
        lengths = [len(p) for p in prompts]
        if not prompts or min(lengths) < 1:
            raise KeptError("every prompt needs at least one token")
        width = prompt_length or max(lengths)
        if max(lengths) > width:
            raise KeptError(f"a prompt has {max(lengths)} tokens, more than prompt_length={width}")
        padded = np.full((len(prompts), width), self.pad_id, np.int32)
        for row, p in zip(padded, prompts):
            row[: len(p)] = p
        start, advance = self.compile(params, len(prompts), width, max_new_tokens)
        cache_lengths = list(self.cache_lengths(width, max_new_tokens))
        began = time.perf_counter()
        state = start(params, padded, np.asarray(lengths, np.int32), jax.random.key(0) if key is None else key)
        steps = np.int32(steps_per_call or max_new_tokens)
        first_token_at = None
        while True:
            count = int(to_host(state.count))  # waits for the step
            if on_step is not None:
                on_step(to_host(state.tokens), count)
            first_token_at = first_token_at or time.perf_counter()
            done = to_host(state.done)
            if count >= max_new_tokens or bool(np.all(done)):
                break
            if len(cache_lengths) > 1 and np.any(~done & (to_host(state.positions) >= cache_lengths[0])):
                cache_lengths.pop(0)  # the last length holds prompt + max_new: a cache can always grow until then
                state, advance = self._grown(params, state, cache_lengths[0])
            state = advance(params, state, steps)
        return self.finish(state, first_token_at - began, time.perf_counter() - first_token_at)

    def finish(self, state: DecodeState, prefill_s: float = 0.0, decode_s: float = 0.0) -> Generation:
        """Each row's ids up to its end-of-sequence token (included) or the tokens generated so far."""
        tokens = to_host(state.tokens)[:, : int(to_host(state.count))]
        rows, stopped = [], []
        for row in tokens.tolist():
            end = next((i for i, t in enumerate(row) if t in self.eos_ids), None)
            rows.append(row if end is None else row[: end + 1])
            stopped.append(end is not None)
        return Generation(rows, stopped, prefill_s, decode_s)
