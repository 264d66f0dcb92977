"""`python -m profiler.accuracy`: perplexity and top-1 agreement of each KV policy on a real model.

Thin entry: parse (`profiler.studies.accuracy.AccuracyConfig`), load the pretrained weights and the
text's token ids, run the study (`run_accuracy`, the CSV rewritten after every setting), print its
table (and with --skew-stats the skewing statistics of `profiler.studies.skew_stats`). Errors are one
line on stderr with exit status 2.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from infinigen_sim.spec.cli import (
    InputError,
    Parser,
    add_dataclass_arguments,
    check_writable,
    dataclass_from_args,
    report_error,
)
from infinigen_sim.spec.io import write_text_atomic
from infinigen_sim.spec.policies import PolicyError
from profiler.studies import skew_stats
from profiler.studies.accuracy import FULL_LAYERS, AccuracyConfig, check, format_table, run_accuracy, to_csv
from profiler.weights.checkpoint import CheckpointError
from profiler.weights.pretrained import load_pretrained
from profiler.weights.texts import load_text_ids

PROG = "python -m profiler.accuracy"


def build_parser() -> Parser:
    parser = Parser(PROG, "Perplexity, top-1 agreement with full KV and fetched fraction of each KV policy on a "
                          "real model, every token of the text predicted in decode mode.",
                    epilog="Units: lengths in tokens, ratios as shares, times in seconds. Exit status: 0 done, "
                           "2 bad input.")
    add_dataclass_arguments(parser, AccuracyConfig)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = dataclass_from_args(AccuracyConfig, build_parser().parse_args(argv))
    except SystemExit as exc:  # --help (0) or a bad flag (2, its one line already printed)
        return int(exc.code or 0)
    try:
        if config.out:
            check_writable("--out", config.out, folder=False)  # before minutes of decoding, not after
        if config.threads:
            torch.set_num_threads(config.threads)
        spec, model = load_pretrained(config.model)
        ids = load_text_ids(config.model, config.text, config.max_tokens)
        check(config, ids.shape[1])
        save = (lambda rows: write_text_atomic(Path(config.out), to_csv(rows))) if config.out else None
        rows = run_accuracy(config, spec, model.eval(), ids, save)
    except (CheckpointError, InputError, PolicyError, ValueError, OSError) as exc:
        return report_error(PROG, exc)
    n_tok = ids.shape[1]
    print(f"{spec.name} on {config.text} ({n_tok} tokens: prefix {config.prefix} prefilled, "
          f"{n_tok - config.prefix - 1} predicted in decode mode); fetched = rows read / cached rows, "
          f"layers >= {FULL_LAYERS}")
    print(format_table(rows, config.prefix))
    if config.skew_stats:
        prompt_len = n_tok // 2
        stats = skew_stats.measure(model.cpu(), ids, prompt_len, config.partial_ratio)
        print(skew_stats.format_stats(stats, n_tok, prompt_len))
    return 0


if __name__ == "__main__":
    sys.exit(main())
