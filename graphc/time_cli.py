"""`graphc time FILE`: the time of a model's train step (its forward pass when it has no train
step) per kernel, attributed to the .nn lines it comes from, as Caffe's `caffe time`
(graphc/timing.py measures; docs/backends.md, "Where the time goes", reads the output)."""
from __future__ import annotations

import argparse

from graphc.cli_types import natural, positive


def add_commands(sub) -> None:
    from graphc.cli_common import add_backend_arg
    p = sub.add_parser("time", help="time a model's train step kernel by kernel",
                       description="Run the train step of a model (its forward pass when it has "
                                   "no train block) on random inputs and print the time of each "
                                   "kernel: its phase (forward, backward, update), the .nn line "
                                   "it comes from, its floating-point operations, GFLOP/s and "
                                   "share of the step; then each phase's total and the kernels' "
                                   "total beside the whole step, measured untimed.")
    p.add_argument("file", metavar="FILE")
    p.add_argument("--model", metavar="NAME", help="which model, when the file holds several")
    add_backend_arg(p, default=None)
    p.add_argument("--batch", type=positive, metavar="N",
                   help="batch size (default: the train block's, else 64)")
    p.add_argument("--iterations", type=positive, default=20, metavar="K",
                   help="timed steps; each kernel's time is its median over them (default 20)")
    p.add_argument("--warmup", type=natural, default=2, metavar="W",
                   help="untimed steps first (default 2)")
    p.add_argument("--seed", type=int, help="seed for parameter initialization and the random "
                                            "inputs (default: the train block's, else 0)")
    p.set_defaults(run=cmd_time)


def cmd_time(args: argparse.Namespace) -> int:
    from graphc.api import build_program
    from graphc.cli_common import report_lints
    from graphc.compiler import check_source, read_source
    from graphc.errors import error
    from graphc.timing import format_timing, time_program
    source = read_source(args.file)
    checked = check_source(source, args.file)
    report_lints(checked, False)
    program = build_program(checked, args.model, args.backend, args.seed)
    if program.backend == "cuda":
        raise error("graphc time times the CPU backends' kernels (numpy, llvm); the cuda "
                    "backend's are timed by `python -m bench.gpu`", hint="use --backend llvm")
    train = program.meta.get("train") or {}
    batch = args.batch or int(train.get("batch") or 64)
    timing = time_program(program, batch, args.iterations, args.warmup,
                          seed=program.seed if args.seed is None else args.seed)
    print(format_timing(timing, {args.file: source.splitlines()}))
    return 0
