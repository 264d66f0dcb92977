"""`python -m profiler.accuracy`: perplexity vs fetched fraction of each KV policy on a real model.

Thin entry: parse (`profiler.studies.accuracy.AccuracyConfig`), check every input before any weights
load (texts, the skew file's header, output paths, the window's length under the model's tokenizer),
load the pretrained weights, fit or read the offline skew, run the study (the CSV rewritten after every
setting), print its table, draw the plot. `--calibrate FILE` only fits the offline skew and writes it.
Errors are one line on stderr with exit status 2.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from infinigen_sim.spec.accuracy import to_csv
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
from profiler.runtime.skew import RANKS
from profiler.studies.accuracy import FULL_LAYERS, SKEW_MODES, STUDY_POLICIES, AccuracyConfig, Study, run_study
from profiler.studies.accuracy import settings as study_settings
from profiler.studies.accuracy_report import format_table, plot_accuracy
from profiler.studies.calibrate import fit_calibration
from profiler.studies.masked import Window
from profiler.weights.checkpoint import CheckpointError
from profiler.weights.pretrained import load_pretrained
from profiler.weights.skew_file import load_skew, read_header, save_skew
from profiler.weights.texts import load_text_ids

PROG = "python -m profiler.accuracy"


def build_parser() -> Parser:
    parser = Parser(PROG, "Perplexity, top-1 agreement with full KV and fetched fraction of each KV policy on a "
                          "real model: a long prompt, then every evaluated position predicted by a masked "
                          "full-sequence forward that reads only the rows its policy has at that decode step.",
                    epilog="Units: lengths in tokens, ratios as shares, times in seconds. Exit status: 0 done, "
                           "2 bad input.")
    add_dataclass_arguments(parser, AccuracyConfig)
    return parser


def check_inputs(config: AccuracyConfig) -> None:
    """Everything that can be checked before the weights load; InputError names the flag."""
    for flag, values, known in (("--policies", config.policies, STUDY_POLICIES), ("--skews", config.skews, SKEW_MODES),
                                ("--ranks", config.ranks, RANKS)):
        unknown = [v for v in values if v not in known]
        if unknown:
            raise InputError(f"{flag}: unknown '{unknown[0]}' (expected one of {', '.join(known)})")
    if "oracle" in config.policies and "infinigen" not in config.policies:
        raise InputError("--policies: oracle needs infinigen (it reads the rows InfiniGen's settings count)")
    if any(not 0 < b <= 1 for b in config.budgets):
        raise InputError("--budgets: expected shares in (0, 1]")
    for flag, path in (("--text", config.text), ("--calibration-text", config.calibration_text)):
        if not Path(path).is_file():
            raise InputError(f"{flag} {path}: no such file")
    offline = config.calibrate is not None or ({"offline", "none"} & set(config.skews) and config.skew_file is None)
    if offline and Path(config.calibration_text).resolve() == Path(config.text).resolve():
        raise InputError(f"--calibration-text {config.calibration_text}: is the evaluated text; fit the skew on "
                         "another one")
    if config.skew_file is not None:
        read_header(config.skew_file, config.model)
    for flag, path in (("--out", config.out), ("--plot", config.plot), ("--calibrate", config.calibrate)):
        if path:
            check_writable(flag, path, folder=False)


def load_window(config: AccuracyConfig) -> Window:
    """The evaluated window's token ids; InputError when the text is shorter than prompt + eval + 1."""
    need = config.prompt_len + config.eval_tokens + 1
    ids = load_text_ids(config.model, config.text, need)
    if ids.shape[1] < need:
        raise InputError(f"--text {config.text}: {ids.shape[1]} tokens, fewer than --prompt-len "
                         f"{config.prompt_len} + --eval-tokens {config.eval_tokens} + 1 = {need}")
    return Window(ids, config.prompt_len)


def calibrations(config: AccuracyConfig, spec, model, cal_ids: torch.Tensor | None) -> dict:
    """Skew mode -> calibration: offline from --skew-file or fitted on cal_ids; none: unskewed; prompt: None."""
    out = {}
    for mode in config.skews:
        if mode == "offline" and config.skew_file is not None:
            out[mode] = load_skew(config.skew_file, config.model, spec.n_kv_heads, spec.head_dim, spec.n_layers,
                                  FULL_LAYERS)
        elif mode in ("offline", "none"):
            out[mode] = fit_calibration(model, cal_ids, FULL_LAYERS, mode == "offline", config.calibration_text,
                                        config.model)
        else:
            out[mode] = None
    return out


def main(argv: Sequence[str] | None = None) -> int:
    try:
        config = dataclass_from_args(AccuracyConfig, build_parser().parse_args(argv))
    except SystemExit as exc:  # --help (0) or a bad flag (2, its one line already printed)
        return int(exc.code or 0)
    try:
        check_inputs(config)
        if config.threads:
            torch.set_num_threads(config.threads)
        window = None if config.calibrate else load_window(config)
        # the unskewed columns ('none') are always fitted on the calibration text; 'offline' only without --skew-file
        fit = (config.calibrate is not None or "none" in config.skews
               or ("offline" in config.skews and config.skew_file is None))
        cal_ids = load_text_ids(config.model, config.calibration_text, config.calibration_tokens) if fit else None
        spec, model = load_pretrained(config.model)
        model = model.to(config.device).eval()
        if config.calibrate:
            cal = fit_calibration(model, cal_ids.to(config.device), FULL_LAYERS, True, config.calibration_text,
                                  config.model)
            save_skew(config.calibrate, cal)
            print(f"wrote {config.calibrate}: skew of {config.model} layers {FULL_LAYERS}-{spec.n_layers - 1}, "
                  f"fitted on {cal_ids.shape[1]} tokens of {Path(config.calibration_text).name}")
            return 0
        if cal_ids is not None:
            print(f"fitting the offline skew on {cal_ids.shape[1]} tokens of {Path(config.calibration_text).name}",
                  file=sys.stderr)
        cals = calibrations(config, spec, model, None if cal_ids is None else cal_ids.to(config.device))
        window = Window(window.ids.to(config.device), window.prompt_len)
        study = Study(spec, model, window, cals, Path(config.text).name, config.chunk)
        todo = study_settings(config, window.positions.tolist())
        save = (lambda rows: write_text_atomic(Path(config.out), to_csv(rows))) if config.out else None
        t0 = time.perf_counter()
        rows = run_study(study, todo, save)
        seconds = time.perf_counter() - t0
    except (CheckpointError, InputError, PolicyError, ValueError, OSError) as exc:
        return report_error(PROG, exc)
    print(f"{spec.name} on {Path(config.text).name}: prompt {config.prompt_len} prefilled, {window.eval_tokens} "
          f"positions predicted (teacher-forced); fetched = rows read / cached rows, layers >= {FULL_LAYERS}; "
          f"ppl per {config.chunk}-position chunk")
    print(format_table(rows))
    print(f"{len(rows)} settings in {seconds:.0f} s (the prompt's and the full-KV pass included in the ideal row's)")
    if config.plot:
        plot_accuracy(rows, config.plot)
        print(f"wrote {config.plot}")
    if config.out:
        print(f"wrote {config.out} ({len(rows)} settings)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
