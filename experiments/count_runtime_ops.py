"""Count the eager ops and timing spans one decode layer of this project's runtime dispatches, per policy.

The source of `host.ops_per_layer` in infinigen_sim/runtimes/infinigen-sim.yaml: one decode step of
`profiler.runtime.engine.Engine` on CPU, with a `TorchDispatchMode` on the dispatching (main) thread that
counts every aten op reaching the dispatcher (views excluded: they launch no kernel), and the engine's
timing spans of that layer (on CUDA each span records two CUDA events, which the host pays for too).
Dispatch modes are per thread, so the copy worker's gathers, copies and commits are not counted: they
run beside the dispatching thread. Counts are structural (the same at any batch, prompt and model
size of a family); layers 0-1 (InfiniGen's full-fetch layers) and the later ones are printed apart.

    python experiments/count_runtime_ops.py [--models tiny-opt,tiny-llama-gqa]
"""

from __future__ import annotations

import argparse
import sys
from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from infinigen_sim.spec.models import get_model
from infinigen_sim.spec.policies import ALL_POLICIES, make_policy
from profiler.runtime.engine import Engine

VIEWS = {"view", "_unsafe_view", "permute", "transpose", "expand", "unsqueeze", "squeeze", "select", "slice",
         "as_strided", "alias", "t", "detach", "reshape", "split", "unbind", "narrow", "view_as"}


class OpCounter(TorchDispatchMode):
    """Counts the non-view aten ops dispatched on this thread."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 - torch's signature
        name = func.__name__.split(".")[0]
        if name not in VIEWS:
            self.ops[name] += 1
        return func(*args, **(kwargs or {}))


def count_layer_ops(model: str, policy: str, batch: int = 2, prompt: int = 64) -> dict[str, tuple[int, int]]:
    """{"head": (ops, spans), "rest": (ops, spans)}: layer 0, and a later layer that speculates its next."""
    spec = get_model(model)
    with Engine(spec, make_policy(policy), "cpu", torch.float32) as engine:
        prompt_ids = torch.randint(0, spec.vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(0))
        engine.generate(prompt_ids, 3)  # warm: caches allocated, worker started
        counts = {}
        original = engine.decode_layer

        def counted(layer, x, input_pos):
            with OpCounter() as counter:
                spans_before = len(engine.timer._seconds)
                out = original(layer, x, input_pos)
                counts[layer] = (sum(counter.ops.values()), len(engine.timer._seconds) - spans_before)
            return out

        engine.decode_layer = counted
        with torch.inference_mode():
            engine.setup_caches(batch, prompt, 3)
            engine.prefill(prompt_ids)
            engine.decode_one_token(prompt_ids[:, -1:], prompt)
        engine.timer.collect(spec.n_layers)
    return {"head": counts[0], "rest": counts[spec.n_layers - 2]}  # n-2 speculates layer n-1


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default="tiny-opt,tiny-llama-gqa", help="zoo models (default: %(default)s)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    print(f"{'model':<16}{'policy':<10}{'layer 0 ops':>12}{'spans':>7}{'later ops':>11}{'spans':>7}")
    for model in args.models.split(","):
        for policy in ALL_POLICIES:
            got = count_layer_ops(model, policy)
            print(f"{model:<16}{policy:<10}{got['head'][0]:>12}{got['head'][1]:>7}{got['rest'][0]:>11}{got['rest'][1]:>7}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
