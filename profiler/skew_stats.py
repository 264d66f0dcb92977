"""`python -m profiler.skew_stats`: skewing's energy concentration and the speculation recall it buys.

Thin entry: parse (`SkewStatsConfig`), load the pretrained weights and the text's token ids, measure
(`profiler.studies.skew_stats.measure`: the first --prompt-len tokens build the skew, the later ones
are measured), print. Errors are one line on stderr with exit status 2.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch

from infinigen_sim.spec.cli import InputError, Parser, add_dataclass_arguments, dataclass_from_args, report_error
from infinigen_sim.spec.policies import make_policy
from profiler.studies.skew_stats import format_stats, measure
from profiler.weights.checkpoint import CheckpointError
from profiler.weights.pretrained import PRETRAINED, load_pretrained
from profiler.weights.texts import PG19_TEXT, load_text_ids

PROG = "python -m profiler.skew_stats"


@dataclass(frozen=True)
class SkewStatsConfig:
    """The flags of `python -m profiler.skew_stats`."""

    model: str = field(default="smollm2-135m", metadata={"help": "pretrained model", "choices": tuple(PRETRAINED)})
    text: str = field(default=str(PG19_TEXT), metadata={"help": "text file to run", "metavar": "FILE"})
    max_tokens: int = field(default=1024, metadata={"help": "tokens of the text to run", "unit": "tokens",
                                                    "minimum": 2})
    prompt_len: int | None = field(default=None, metadata={
        "help": "tokens that build the skew; the later ones are measured (default: half)", "unit": "tokens",
        "minimum": 1})
    partial_ratio: float = field(default=make_policy("infinigen").partial_ratio, metadata={
        "help": "share of each head's columns kept", "unit": "share of head_dim"})
    threads: int | None = field(default=None, metadata={"help": "torch intra-op threads (default: torch's)",
                                                        "minimum": 1})


def build_parser() -> Parser:
    parser = Parser(PROG, "Skewing on a real model: the share of |Q|^2 in the kept columns before and after, and "
                          "the attention mass speculation's top-k rows hold.",
                    epilog="Units: lengths in tokens, shares in [0, 1]. Exit status: 0 done, 2 bad input.")
    add_dataclass_arguments(parser, SkewStatsConfig)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = dataclass_from_args(SkewStatsConfig, build_parser().parse_args(argv))
    except SystemExit as exc:  # --help (0) or a bad flag (2, its one line already printed)
        return int(exc.code or 0)
    try:
        if config.threads:
            torch.set_num_threads(config.threads)
        _, model = load_pretrained(config.model)
        ids = load_text_ids(config.model, config.text, config.max_tokens)
        prompt_len = config.prompt_len or ids.shape[1] // 2
        if prompt_len >= ids.shape[1]:
            raise InputError(f"--prompt-len {prompt_len}: needs fewer than the text's {ids.shape[1]} tokens")
        stats = measure(model.eval(), ids, prompt_len, config.partial_ratio)
    except (CheckpointError, InputError, ValueError, OSError) as exc:
        return report_error(PROG, exc)
    print(format_stats(stats, ids.shape[1], prompt_len))
    return 0


if __name__ == "__main__":
    sys.exit(main())
