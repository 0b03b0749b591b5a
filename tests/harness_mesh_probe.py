"""Run by tests/test_harness.py in processes of their own with several (simulated) devices each: the requests of
`requests.json` through kept_jax's lm-eval model placed on a mesh of every process's devices; the first process
drives and prints the results as JSON, the others follow it (kept_jax.lockstep).

    XLA_FLAGS=--xla_force_host_platform_device_count=2 JAX_COORDINATOR_ADDRESS=localhost:PORT JAX_NUM_PROCESSES=2 \
        JAX_PROCESS_ID=0|1 python -m tests.harness_mesh_probe requests.json
"""

import json
import sys

from lm_eval.api.instance import Instance

from kept_jax import lockstep, sharding
from kept_jax.harness import KeptJaxLM


def answers(model_args: dict, requests: dict) -> dict | None:
    """{kind: results} for {kind: [arguments, ...]} (loglikelihood, loglikelihood_rolling, generate_until); None on a
    following process."""
    model = KeptJaxLM(**model_args)
    if not lockstep.is_leader():
        model.serve()
        return None
    out = {}
    for kind, arguments in requests.items():
        instances = [Instance(request_type=kind, doc={}, arguments=tuple(a), idx=i) for i, a in enumerate(arguments)]
        out[kind] = getattr(model, kind)(instances)
    lockstep.release()
    return out


def main(argv: list[str]) -> int:
    sharding.initialize_distributed()
    with open(argv[0], encoding="utf-8") as f:
        runs = json.load(f)  # [{"model_args": {...}, "requests": {...}}, ...]
    results = [answers(run["model_args"], run["requests"]) for run in runs]
    if lockstep.is_leader():
        print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
