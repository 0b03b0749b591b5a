import atexit
import contextlib
import io
import os
import shutil
import tempfile

import pytest

FAST_XLA_FLAGS = (
    "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true --xla_cpu_use_fusion_emitters=false"
    " --xla_cpu_parallel_codegen_split_count=1"
)

# XLA's compiled programs are kept on disk for this session, set before anything imports jax: the many small jobs
# the tests run (in this process and in the subprocesses they start, which inherit the variable) compile the same
# programs again and again, and each Job makes new closures that jit's in-memory cache cannot match. The directory
# starts empty, so a clean clone's time is an honest one; KEPT_JAX_TEST_CACHE=0 runs without it. Every program is
# kept, however fast it compiled: half of the suite's ~4,400 compiles then come from the disk, and six files' tests
# ran in 117-118 s against 123-125 s keeping only those over 0.2 s (2026-12-02).
if os.environ.get("KEPT_JAX_TEST_CACHE", "1") != "0" and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="kept_jax-test-xla-")
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")

# The tests compile hundreds of small programs and run each for milliseconds: XLA's CPU backend compiles them
# without LLVM's optimizations and with its older loop emitters instead of the fusion emitters (the HLO passes are
# the product's). Compiling the tiny Orion's loss and gradients then takes 0.4 s instead of 2.4 s and running it 25%
# longer; results differ from an optimized build by float rounding, 4.8e-7 at most (2e-6 of the largest gradient).
# With the convert-I/O test's smaller checkpoint, the suite went 7 min 20 s -> 5 min 32 s on 2 workers (2026-12-02).
# Each program is also emitted as one LLVM module, not split to be compiled on several threads (the other worker
# holds the other core): the tiny Orion's gradients compile in 0.26 s instead of 0.31 s and run 13% faster; four test
# files took 59-60 s against 64 s (2026-12-02).
# Subprocesses inherit the flags; KEPT_JAX_TEST_FAST_XLA=0 compiles as the product does.
if os.environ.get("KEPT_JAX_TEST_FAST_XLA", "1") != "0" and FAST_XLA_FLAGS not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"), FAST_XLA_FLAGS]))

# Under pytest-xdist, each worker's OpenMP pool (torch's CPU kernels) gets its share of the cores instead of all of
# them: two workers on two cores otherwise run four spinning threads. Four test files took 64-66 s against 68-70 s
# (2026-12-02). Job processes the tests start inherit it.
_workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _workers > 1:
    os.environ.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // _workers)))

# The fixtures below import their helpers (tests/fixtures.py: torch and Transformers, about 10 s) when they run, so
# that the xdist controller, which loads this file before it starts the workers, does not wait for them.


@pytest.fixture(scope="session")
def sp_model(tmp_path_factory) -> str:
    from tests import fixtures as fx

    return fx.train_sentencepiece(str(tmp_path_factory.mktemp("sentencepiece")))


@pytest.fixture(scope="session")
def orion_checkpoint(tmp_path_factory, sp_model):
    """(directory, torch reference model) of the tiny Orion, with its SentencePiece tokenizer. Do not modify."""
    from tests import fixtures as fx

    model = fx.make_orion_reference(fx.base_config("tiny-orion"), seed=1)
    path = fx.save_orion(model, str(tmp_path_factory.mktemp("ckpt") / "orion"))
    fx.add_orion_tokenizer(path, sp_model)
    return path, model


@pytest.fixture(scope="session")
def llama_checkpoint(tmp_path_factory, sp_model):
    """(directory, torch model) of the tiny Llama, with a Transformers-converted tokenizer.json. Do not modify."""
    from tests import fixtures as fx

    model = fx.make_llama(fx.base_config("tiny-llama"), seed=2)
    path = fx.save_llama(model, str(tmp_path_factory.mktemp("ckpt") / "llama"))
    fx.add_llama_tokenizer(path, sp_model)
    return path, model


@pytest.fixture(scope="session")
def orion_bpe_checkpoint(tmp_path_factory):
    """(directory, torch reference model) of the tiny Orion with a byte-level BPE tokenizer.json, as SmolLM ships
    one (tokenizer_config.json naming GPT2Tokenizer, a ChatML template). Do not modify."""
    from tests import fixtures as fx

    model = fx.make_orion_reference(fx.base_config("tiny-orion"), seed=1)
    path = fx.save_orion(model, str(tmp_path_factory.mktemp("ckpt") / "orion-bpe"))
    fx.add_byte_level_tokenizer(path, model.config.vocab_size)
    return path, model


@pytest.fixture(scope="session")
def llama_bpe_checkpoint(tmp_path_factory):
    """(directory, torch model) of the tiny Llama with the same byte-level BPE tokenizer. Do not modify."""
    from tests import fixtures as fx

    model = fx.make_llama(fx.base_config("tiny-llama"), seed=2)
    path = fx.save_llama(model, str(tmp_path_factory.mktemp("ckpt") / "llama-bpe"))
    fx.add_byte_level_tokenizer(path, model.config.vocab_size)
    return path, model


@pytest.fixture
def orion_copy(orion_checkpoint, tmp_path) -> str:
    """A private copy of the tiny Orion directory that a test may damage."""
    dst = str(tmp_path / "orion")
    shutil.copytree(orion_checkpoint[0], dst)
    return dst


@pytest.fixture(scope="session")
def kept_export(tmp_path_factory):
    """(directory, stdout) of `python -m kept_jax.convert` on the embedded tiny Orion: the KEPT student as a stock
    Llama export (bf16), with its tokenizer. Do not modify."""
    from kept_jax import convert

    out = str(tmp_path_factory.mktemp("convert") / "tiny-llama")
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):  # the command line, run in this process
        assert convert.main(["--out", out, "--opm", "absorb", "--calib-tokens", "2048", "--eval-tokens", "2048"]) == 0
    return out, stdout.getvalue()
