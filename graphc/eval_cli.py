"""`graphc eval` and `graphc predict`: a trained run or an artifact scored on a split, or run on
raw inputs (their parsers are made in train_cli.add_commands, beside `train`'s)."""
from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

from graphc.errors import error

if TYPE_CHECKING:
    import numpy as np


def _with_settings(program, settings: dict):
    program.meta["train"] = settings
    return program


def _source_dir(program) -> Path:
    """Where relative data paths of an artifact's train block resolve: its .nn file's folder."""
    source = program.meta.get("source")
    return Path(source).parent if source and Path(source).exists() else Path(".")


def _scores(scores: dict) -> str:
    text = f"loss {scores['loss']:.4f}"
    if "accuracy" in scores:
        text += f", accuracy {100 * scores['accuracy']:.2f}%"
    return text


# --- eval and predict -------------------------------------------------------------------------------

def _open_target(args):
    """(program, run config or None) for the run folder or artifact folder args.target, on
    --backend in --precision."""
    program, config = _open_folder(args.target, args.backend)
    program.use_precision(args.precision)
    return program, config


def _open_folder(target: str, backend: str):
    from graphc.runtime import load_artifact
    from graphc.runtime.runs import RunFolder
    if RunFolder.is_run(target):
        run = RunFolder(target)
        config = run.config()
        program, _ = run.load_trained(backend)
        return _with_settings(program, config["settings"]), config
    if not Path(target).is_dir():
        raise error(f"{target}: no such run or artifact folder")
    return load_artifact(target, backend=backend), None


def cmd_eval(args) -> int:
    from graphc.runtime.train import TrainSettings, evaluate_arrays, prepare_data
    program, config = _open_target(args)
    settings = TrainSettings.of(program)
    if settings.steps is not None:        # a language model trained by steps on text
        return _eval_text(args, program, settings, config)
    # A run's program and a trained/ artifact hold their preprocessing: they take the raw split.
    if config is not None:
        data = prepare_data(program, settings, args.data_dir or config.get("data_dir"),
                            config["base_dir"], scaler=config["data"]["scaler"],
                            splits=(args.split,))
    else:
        data = prepare_data(program, settings, args.data_dir, _source_dir(program),
                            splits=(args.split,))
    x, y = data.splits[args.split]
    scores = evaluate_arrays(program, x, y, data.features, data.labels, batch=args.batch)
    print(f"{args.split}: {_scores(scores)} ({len(y):,} samples)")
    return 0


def _eval_text(args, program, settings, config) -> int:
    """The loss of a model trained by steps over a whole split of its text (consecutive
    windows, as the run's last evaluation): train or val; text has no test split."""
    from graphc.runtime.steps import StepTrainer
    from graphc.runtime.text_data import load_text_data, trained_vocab
    if args.split == "test":
        raise error("a model trained by steps on text has a train and a val split, no test split",
                    hint="pass --split val")
    base_dir = config["base_dir"] if config is not None else _source_dir(program)
    data = load_text_data(settings, base_dir, vocab=trained_vocab(program))
    loss = StepTrainer(program, settings, data).evaluate_split(args.split)
    windows = len(data.windows(args.split)[0])
    print(f"{args.split}: loss {loss:.4f} ({windows:,} windows of {data.context} characters)")
    return 0


def cmd_predict(args) -> int:
    import numpy as np

    from graphc.cli_common import load_array
    from graphc.runtime.fit import as_samples, forward_batched
    from graphc.runtime.program import ProgramError
    if args.no_scale:       # it once skipped the run's scaling, and so could scale twice
        raise error("--no-scale is gone: a trained model scales its inputs itself",
                    hint="pass raw values, or --inputs scaled for values scaled as in training")
    program, config = _open_target(args)
    try:
        name = program.feature_input()
    except ProgramError as err:
        raise error(f"{args.target}: {err}",
                    hint="use `graphc run` with one --input per input") from None
    try:
        x, _ = as_samples(load_array(args.input), program.inputs[name], name)
    except ProgramError as err:
        raise error(f"{args.input}: {err}") from None
    x = _raw_inputs(program, x, args)
    if args.mc_samples is not None:
        return _predict_mc(program, config, name, x, args)
    try:
        outputs = forward_batched(program, name, x, args.batch)
    except ValueError as err:
        raise error(f"{args.input}: {err}") from None
    task = program.meta.get("task") or {}
    if task.get("kind") != "classification":
        _print_outputs(outputs)
        if args.out:
            np.savez(args.out, **outputs)
        return 0
    probs = _probabilities(outputs[task["output"]], task.get("scores"))
    classes = probs.argmax(axis=1)
    names = (config or {}).get("data", {}).get("classes")
    for i, (c, p) in enumerate(zip(classes, probs)):
        top = np.argsort(p)[::-1][:3]
        label = names[c] if names else str(c)
        others = ", ".join(f"{names[t] if names else t}: {p[t]:.3f}" for t in top)
        print(f"{i}: {label}  ({others})")
    if args.out:
        np.savez(args.out, classes=classes, probabilities=probs)
        print(f"wrote classes and probabilities to {args.out}", file=sys.stderr)
    return 0


def _raw_inputs(program, x, args):
    """The samples as the program takes them: raw values, where it holds its preprocessing.
    Inputs that look scaled already (far outside the raw range seen in training, inside the
    scaled one) are mapped back with a warning under --inputs auto; under --inputs raw or scaled
    they are taken as said, with a warning where they do not look it."""
    from graphc.ir.preprocess import judge_inputs
    prep = program.preprocessing
    if prep is None or prep.mode == "none":
        return x
    seen = judge_inputs(prep, x)
    dtype = program.inputs[prep.input].dtype.numpy       # what raw values are fed as
    if args.inputs == "scaled":
        x = prep.raw_values(x).astype(dtype)
        if judge_inputs(prep, x) != "raw":
            _input_warning(program, x, "mapped back from --inputs scaled, they still lie outside "
                                       "the raw range: were they raw already? then leave out "
                                       "--inputs scaled")
        return x
    if seen == "raw":
        return x
    if seen == "scaled" and args.inputs == "auto":
        _input_warning(program, x, f"they look scaled already (training scaled them to "
                                   f"{_extent(prep.scaled_range)}), so they are mapped back to "
                                   f"raw values first; pass raw values, or say which with "
                                   f"--inputs raw or --inputs scaled")
        return prep.raw_values(x).astype(dtype)
    _input_warning(program, x, "the predictions may mean nothing; pass values as the data set "
                               "stores them (--inputs scaled if they were scaled as in training)")
    return x


def _extent(extent) -> str:
    return f"[{extent[0]:.4g}, {extent[1]:.4g}]"


def _input_warning(program, x, what: str) -> None:
    import numpy as np
    prep = program.preprocessing
    print(f"warning: the inputs lie in {_extent((np.min(x), np.max(x)))}, but {program.name} was "
          f"trained on raw {prep.raw_dtype} values in {_extent(prep.raw_range)} and scales them "
          f"itself ({prep.mode}); {what}", file=sys.stderr, flush=True)


def _predict_mc(program, config, name: str, x, args) -> int:
    """Monte Carlo dropout: the mean and standard deviation of K predictions with dropout on;
    for a classifier over the class probabilities (the predictive distribution)."""
    import numpy as np

    from graphc.runtime.program import ProgramError
    if args.mc_samples < 2:
        raise error("--mc-samples needs at least 2 samples to measure a spread")
    try:
        stacked = program.sample(args.mc_samples, **{name: x})
    except ProgramError as err:
        raise error(f"{args.target}: {err}", hint="MC dropout needs dropout in the model") from None
    except ValueError as err:
        raise error(f"{args.input}: {err}") from None
    task = program.meta.get("task") or {}
    if task.get("kind") != "classification":
        result = {}
        for out, values in stacked.items():
            result[f"{out}_mean"], result[f"{out}_std"] = values.mean(axis=0), values.std(axis=0)
        _print_outputs(result)
    else:
        probs = np.stack([_probabilities(s, task.get("scores")) for s in stacked[task["output"]]])
        mean, std = probs.mean(axis=0), probs.std(axis=0)
        names = (config or {}).get("data", {}).get("classes")
        for i, c in enumerate(mean.argmax(axis=1)):
            label = names[c] if names else str(c)
            print(f"{i}: {label}  (p = {mean[i, c]:.3f} ± {std[i, c]:.3f} over {args.mc_samples} "
                  f"samples)")
        result = {"classes": mean.argmax(axis=1), "probabilities": mean, "std": std}
    if args.out:
        np.savez(args.out, **result)
        print(f"wrote {', '.join(result)} to {args.out}", file=sys.stderr)
    return 0


def _probabilities(scores: np.ndarray, kind: str | None) -> np.ndarray:
    import numpy as np

    if kind == "probabilities":
        return scores
    if kind == "log_probabilities":
        return np.exp(scores)
    shifted = scores - scores.max(axis=1, keepdims=True)
    e = np.exp(shifted)
    return e / e.sum(axis=1, keepdims=True)


def _print_outputs(outputs: dict) -> None:
    import numpy as np

    with np.printoptions(precision=4, suppress=True, threshold=50, edgeitems=3):
        for key, value in outputs.items():
            print(f"{key}: {value.dtype}{list(value.shape)}\n{value}")
