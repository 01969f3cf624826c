"""The training commands of the command line: `graphc train` (and the parsers of `graphc eval` and
`graphc predict`, which run in eval_cli.py)."""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

import graphc
from graphc.cli_types import natural, positive, positive_float
from graphc.errors import error
from graphc.eval_cli import _scores, _source_dir, _with_settings, cmd_eval, cmd_predict

NORMS_EVERY = 20          # graphc.runtime.norms.EVERY, without importing numpy for --help


def add_commands(sub) -> None:
    p = sub.add_parser("train", help="train a model on its data; write a run folder",
                       description="Train the model of FILE.nn (or of a built artifact) with its "
                                   "train block, writing a run folder: configuration, metrics, "
                                   "checkpoints, the trained model and its test scores.")
    p.add_argument("file", metavar="FILE.nn|ARTIFACT", nargs="?",
                   help="the model to train (leave out with --resume)")
    p.add_argument("--model", metavar="NAME", help="which model, when the file holds several")
    p.add_argument("--data-dir", metavar="DIR",
                   help="folder of the MNIST/Fashion-MNIST files (default: $GRAPHC_DATA)")
    p.add_argument("--epochs", type=positive, metavar="E", help="override the train block")
    p.add_argument("--steps", type=positive, metavar="S",
                   help="override the train block's steps (a model trained by steps on text; a "
                        "warmup_cosine schedule without steps of its own follows); with --resume, "
                        "train the run on to S steps")
    p.add_argument("--batch", type=positive, metavar="B", help="override the batch size")
    p.add_argument("--lr", type=positive_float, metavar="LR", help="override the learning rate")
    p.add_argument("--seed", type=natural, metavar="S",
                   help="override the seed (initialization, splits, shuffling, dropout)")
    p.add_argument("--out", metavar="DIR", help="run folder (default: runs/MODEL-TIME)")
    p.add_argument("--resume", metavar="RUN", help="continue an interrupted run from its last "
                                                   "checkpoint (same result as never stopping)")
    p.add_argument("--quiet", action="store_true", help="no progress bar and no epoch lines")
    p.add_argument("--check-numerics", action="store_true",
                   help="check every step for NaN and infinity; on the first, run that step "
                        "again node by node and name the .nn line whose operation made it "
                        "(slower: each step's parameters are copied first)")
    p.add_argument("--track-norms", type=positive, nargs="?", const=NORMS_EVERY, metavar="K",
                   help=f"every K steps (default {NORMS_EVERY}), record the L2 norm of every "
                        f"parameter and of its gradient in RUN/norms.jsonl, for `graphc report` "
                        f"(costs one extra forward and backward pass per record)")
    _add_backend(p)
    p.add_argument("--Werror", action="store_true", dest="werror",
                   help="treat lint warnings (and advice) about the .nn file as errors")
    p.add_argument("--ranks", type=positive, metavar="N",
                   help="data-parallel training in N processes on this machine, started with "
                        "mpiexec (each trains on 1/N of every batch; needs "
                        "pip install -e '.[mpi]'; see docs/distributed.md)")
    p.set_defaults(run=cmd_train)

    p = sub.add_parser("eval", help="score a trained run or an artifact on a data split",
                       description="Evaluate a run folder (or an artifact) on its data.")
    p.add_argument("target", metavar="RUN|ARTIFACT")
    p.add_argument("--split", choices=["train", "val", "test"], default="test")
    p.add_argument("--data-dir", metavar="DIR", help="folder of the MNIST/Fashion-MNIST files")
    p.add_argument("--batch", type=positive, default=256, metavar="B",
                   help="samples per evaluation pass (bounds the memory; default 256)")
    _add_backend(p)
    p.set_defaults(run=cmd_eval)

    p = sub.add_parser("predict", help="predict classes (or values) for inputs in a .npy file",
                       description="Run a trained model on raw inputs (scaled as in training) and "
                                   "print each sample's class and probabilities, or its outputs.")
    p.add_argument("target", metavar="RUN|ARTIFACT")
    p.add_argument("--input", "-i", metavar="FILE.npy", required=True,
                   help="samples, one per row (or a single sample)")
    p.add_argument("--inputs", choices=["auto", "raw", "scaled"], default="auto", dest="inputs",
                   help="raw: values as the data set stores them (the model scales them itself); "
                        "scaled: scaled already as in training (mapped back to raw values first); "
                        "auto (the default): raw, unless they lie far outside the raw range seen "
                        "in training and inside the scaled one (said in a warning)")
    p.add_argument("--batch", type=positive, default=256, metavar="B",
                   help="samples per forward pass (bounds the memory; default 256)")
    p.add_argument("--no-scale", action="store_true", help=argparse.SUPPRESS)   # see cmd_predict
    p.add_argument("-o", "--out", metavar="FILE.npz", help="save predictions to a .npz file")
    p.add_argument("--mc-samples", type=int, metavar="K",
                   help="Monte Carlo dropout: K predictions with dropout on; print their mean "
                        "and standard deviation (the model's uncertainty)")
    _add_backend(p)
    p.set_defaults(run=cmd_predict)


def _add_backend(p) -> None:
    # Checkpoints hold plain arrays, so a run trained on one backend resumes or scores on another.
    # Without --backend, a model runs where its train block's `backend` or `device` says, else
    # on `auto` (graphc.targets.backend_for).
    from graphc.cli_common import add_backend_arg
    add_backend_arg(p, precision=True, default=None)


# --- train ------------------------------------------------------------------------------------------

def cmd_train(args) -> int:
    from graphc import mpi_cli
    if mpi_cli.should_launch(args):         # --ranks N: mpiexec starts N of this command
        return mpi_cli.launch(args)
    if mpi_cli.launched_size() > 1:        # one of the ranks mpiexec started
        return mpi_cli.run_rank(args, _train)
    return _train(args)


def _train(args, group=None) -> int:
    """`graphc train` in this process; `group` (an MPIGroup): as one rank of a data-parallel run,
    where rank 0 alone writes the run folder and prints."""
    from graphc.runtime.runs import RunFolder
    from graphc.runtime.train import Trainer
    root, ranks = group is None or group.rank == 0, 1 if group is None else group.size
    if args.resume:
        if group is None:
            run, config, program, settings, data = _resume(args)
        else:
            from graphc.runtime.distributed import agree
            run, config, program, settings, data = agree(group, lambda: _resume(args, group))
        if settings.steps is not None:          # a language model on text: by steps
            from graphc.steps_cli import resume_steps
            return resume_steps(args, run, program, settings, data, config.get("horizon"))
    else:
        if args.file is None:
            raise error("graphc train needs a .nn file, an artifact, or --resume RUN")
        if group is None:
            program, base_dir, settings, data = _prepare(args)
        else:     # what every rank met, compared: an error all met alike is said once, cleanly
            from graphc.runtime.distributed import agree
            program, base_dir, settings, data = agree(group, lambda: _prepare(args, group))
        run = RunFolder(args.out or Path("runs") / f"{_run_name(program.name)}-"
                                                   f"{time.strftime('%Y%m%d-%H%M%S')}")
        if settings.steps is not None:          # a language model on text: by steps
            from graphc.steps_cli import train_steps
            return train_steps(args, program, settings, base_dir, run.path)
        if group is not None:           # every rank names rank 0's folder (the time differs)
            from graphc.runtime.distributed import check_same_settings
            run = RunFolder(group.broadcast(str(run.path)))
            check_same_settings(group, settings.to_json())    # before rank 0 creates the folder
        if RunFolder.is_run(run.path) and root:
            raise error(f"{run.path}: already holds a run",
                        hint=f"continue it with --resume {run.path}, or choose another --out")
        program.meta["train"] = settings.to_json()
        if root:
            run.create(program, {
                "model": program.name, "source": program.meta.get("source"),
                "graphc_version": graphc.__version__, "settings": settings.to_json(),
                "data": data.describe(), "base_dir": str(Path(base_dir).resolve()),
                "data_dir": str(Path(args.data_dir).resolve()) if args.data_dir else None,
                "track_norms": args.track_norms, **({"ranks": ranks} if ranks > 1 else {})})
    # A resumed run keeps recording norms as it was started (or from now on, with the flag).
    every = args.track_norms or (config.get("track_norms") if args.resume else None)
    norms = None
    if every:
        from graphc.runtime.norms import NORMS, NormRecorder
        norms = NormRecorder(run.path / NORMS, every)
    if not root:                  # rank 0 writes and prints for all
        run, args.quiet = None, True
    options = dict(on_epoch=None if args.quiet else _print_epoch, progress=not args.quiet,
                   norms=norms, check_numerics=args.check_numerics, on_warning=_warn)
    if group is None:
        trainer = Trainer(program, settings, data, run, **options)
    else:
        from graphc.runtime.distributed import DistributedTrainer
        trainer = DistributedTrainer(group, program, settings, data, run, **options)
    if args.resume and root:
        run.remove_temporaries()
        if run.last.exists() or run.last.is_symlink():
            trainer.resume()    # else it was stopped before its first checkpoint: from step 0
    if group is not None:
        trainer.share_start()     # rank 0's parameters, state and loop, drawn or resumed
    if not args.quiet:
        print(_headline(program, settings, data, run, trainer.loop.epoch), flush=True)
    try:
        scores = trainer.fit()
    except KeyboardInterrupt:
        if not root:              # rank 0 says it (mpiexec passes Ctrl-C to every rank)
            return 130
        done = trainer.saved_epochs
        resume = "" if group is None else f" --ranks {ranks}"
        print(f"\ngraphc: interrupted; {run.path} holds {done} finished epoch"
              f"{'s' if done != 1 else ''}" + (f": continue with graphc train --resume {run.path}"
                                                f"{resume}" if done else ""), file=sys.stderr)
        return 130
    if trainer.loop.stopped_early and not args.quiet:
        print(f"early stop after epoch {trainer.loop.epoch}: restored the parameters of epoch "
              f"{trainer.loop.best_epoch}")
    if root:
        print("test: " + _scores(scores["test"]))
    if not args.quiet:
        print(f"run saved to {run.path}")
    return 0


def _resume(args, group=None):
    """The run folder, its config, program, settings and data of `--resume RUN` (on each rank of
    a data-parallel run)."""
    from graphc.runtime.runs import RunFolder
    from graphc.runtime.train import TrainSettings, prepare_data
    ranks, root = (1, True) if group is None else (group.size, group.rank == 0)
    for flag in ("file", "batch", "lr", "seed", "out", "model"):
        if getattr(args, flag) is not None:
            raise error(f"--resume continues a run exactly as it was started; "
                        f"{'FILE' if flag == 'file' else '--' + flag} cannot be given with it",
                        hint="only --epochs or --steps (to train longer) and --data-dir may change")
    run = RunFolder(args.resume)
    run.check_confined()
    config = run.config()
    if config.get("ranks", 1) != ranks:
        from graphc.mpi_cli import other_ranks
        raise other_ranks(run.path, config.get("ranks", 1), ranks)
    steps = config["settings"].get("steps")
    _by_steps_or_epochs(args, steps, str(run.path))
    if steps is not None:
        _one_process_steps(args, ranks)
        if args.steps is not None and args.steps < steps:
            raise error(f"{run.path} is set for {steps} steps; --resume trains a run on, not back",
                        hint=f"give --steps {steps} or more")
    program = run.load_program(args.backend)
    program.use_precision(args.precision)
    overrides = {flag: getattr(args, flag) for flag in ("epochs", "steps")
                 if getattr(args, flag) is not None}
    if "steps" in overrides and "horizon" not in config:
        # the steps its schedule decays over, if it follows them: kept from the run's start, so
        # the extra steps train at the schedule's floor, as --resume --epochs does past a
        # cosine's period; out of the settings, so the trained model trained anew follows its own
        config["horizon"] = steps
    config["settings"].update(overrides)
    settings = TrainSettings.of(_with_settings(program, config["settings"]))
    if settings.steps is not None:      # text by steps, with the run's vocabulary
        from graphc.runtime.text_data import load_text_data, trained_vocab
        data = load_text_data(settings, config["base_dir"], vocab=trained_vocab(program))
    else:
        data = prepare_data(program, settings, args.data_dir or config.get("data_dir"),
                            config["base_dir"], scaler=config["data"]["scaler"])
    if overrides and root:      # recorded once all is checked: a later plain --resume goes as far
        run.write_json("config.json", config)
    return run, config, program, settings, data


def _prepare(args, group=None):
    """The program, its folder, the settings and the data of a new run (for each rank of a
    data-parallel run), all before a run folder exists: refused, the run leaves nothing."""
    from graphc.runtime.train import TrainSettings, prepare_data
    ranks, root = (1, True) if group is None else (group.size, group.rank == 0)
    program, base_dir = _load_trainable(args, ranks, root)
    settings = TrainSettings.of(program, epochs=args.epochs, batch=args.batch, lr=args.lr,
                                seed=args.seed)
    _by_steps_or_epochs(args, settings.steps, f"model {program.name}")
    if settings.steps is not None:
        _one_process_steps(args, ranks)
        settings = replace(settings, steps=args.steps or settings.steps)
    program.use_precision(args.precision)
    program.compile()     # native code now: a missing GPU fails before a run folder exists
    if settings.steps is not None:      # text by steps: the step trainer reads its own data
        return program, base_dir, settings, None
    if group is not None:
        from graphc.runtime.distributed import check_ranks
        check_ranks(settings.batch, ranks)
    return program, base_dir, settings, prepare_data(program, settings, args.data_dir, base_dir)


def _by_steps_or_epochs(args, steps: int | None, what: str) -> None:
    """--epochs for what trains by epochs, --steps for what trains by steps (text)."""
    if steps is not None and args.epochs is not None:
        raise error(f"{what} trains by steps ({steps}); --epochs does not apply to it",
                    hint="give --steps instead")
    if steps is None and args.steps is not None:
        raise error(f"{what} trains by epochs; --steps applies to a model trained by steps on "
                    f"text data", hint="give --epochs instead")


def _one_process_steps(args, ranks: int) -> None:
    """What training by steps does not do, refused before anything is written."""
    if ranks > 1:
        raise error("training by steps (text data) runs in one process; --ranks and mpiexec "
                    "train by epochs", hint="leave out --ranks")
    for flag in ("track_norms", "check_numerics"):
        if getattr(args, flag):
            raise error(f"--{flag.replace('_', '-')} watches training by epochs; a model trained "
                        f"by steps on text does not record it", hint="leave it out")


def _warn(message: str) -> None:
    print(f"warning: {message}\nhint: try a smaller --lr; the run goes on", file=sys.stderr,
          flush=True)
def _run_name(model: str) -> str:
    """The model's name as the start of a folder name. Artifacts hold identifiers only (checked
    at load); this keeps a name from a file out of paths even if that check were bypassed."""
    from graphc.files import is_identifier
    if not is_identifier(model):
        raise error(f"model name {model[:60]!r} cannot name a run folder", hint="pass --out DIR")
    return model


def _load_trainable(args, ranks: int = 1, root: bool = True):
    """A program to train from a .nn file or an artifact folder, and the folder that relative
    data paths are taken from; `ranks` > 1: its train step all-reduces across that many ranks.
    Lint warnings are printed by rank 0 (`root`) alone; --Werror stops every rank."""
    path = Path(args.file)
    if path.is_dir():
        from graphc.runtime import load_artifact
        if args.model:
            raise error("--model picks a model of a .nn file; an artifact holds one")
        if ranks > 1:
            raise error(f"{path}: an artifact's train step is built for one process; "
                        f"training on {ranks} ranks compiles it again with an all-reduce",
                        hint="train the .nn file it was built from")
        program = load_artifact(path, backend=args.backend)
        return program, _source_dir(program)
    from graphc.api import build_program
    from graphc.cli_common import report_lints
    from graphc.compiler import check_source, read_source
    checked = check_source(read_source(path), str(path))
    report_lints(checked, args.werror, show=root)
    program = build_program(checked, args.model, args.backend, args.seed, ranks=ranks)
    return program, path.parent


def _headline(program, settings, data, run, done: int) -> str:
    sizes = data.describe()["sizes"]
    name, options = settings.optimizer.name, settings.optimizer.options
    opts = ", ".join(f"{k}={v}" for k, v in options.items() if v not in (None, False, 0, 0.0)
                     or k == "lr")
    what = "resuming" if done else "training"
    ranks = program.meta.get("ranks", 1)
    split = f" ({settings.batch // ranks} on each of {ranks} ranks)" if ranks > 1 else ""
    return (f"{what} {program.name} on {settings.data.name} ({sizes['train']:,} train / "
            f"{sizes['val']:,} val / {sizes['test']:,} test): {name}({opts}), "
            f"{settings.epochs} epochs of batch {settings.batch}{split}, seed {settings.seed} "
            f"-> {run.path}")


def _print_epoch(row: dict) -> None:
    acc, val_acc = row.get("accuracy"), row.get("val_accuracy")
    acc_text = "" if acc is None else f", accuracy {100 * acc:.2f}%"
    val_acc_text = "" if val_acc is None else f", val accuracy {100 * val_acc:.2f}%"
    print(f"epoch {row['epoch']}: loss {row['loss']:.4f}{acc_text}, val loss {row['val_loss']:.4f}"
          f"{val_acc_text}, lr {row['lr']:.3g}, {_duration(row['seconds'])} "
          f"({row['samples_per_s']:,} samples/s)", flush=True)


def _duration(seconds: float) -> str:
    """Milliseconds under a second (a digits epoch takes tens of them), else seconds."""
    return f"{1000 * seconds:.0f} ms" if seconds < 1 else f"{seconds:.1f} s"
