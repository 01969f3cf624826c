"""The graphc command line: check, build, graph and run here; train, eval and predict in
train_cli.py. Exit status 1 for mistakes in the input, 2 for bad usage; a Python traceback only
for graphc's own bugs (and with --debug)."""
from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import graphc
from graphc.cli_common import add_backend_arg, configure_logging, load_array, load_npz, report_lints
from graphc.errors import GraphcError, error

if TYPE_CHECKING:
    import numpy as np

log = logging.getLogger("graphc")


def _add_model_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", metavar="NAME", help="which model, when the file holds several")


def _add_werror_arg(p: argparse.ArgumentParser) -> None:
    p.add_argument("--Werror", action="store_true", dest="werror",
                   help="treat lint warnings (and advice) as errors")


# The commands defined in this file. Naming one of them, the other modules' commands are left
# out of the parser: they import what `build` never needs (the search specs import the whole op
# table), and a build from the build cache should cost little more than starting Python.
OWN_COMMANDS = ("check", "build", "graph", "run")


def make_parser(own_only: bool = False) -> argparse.ArgumentParser:
    """The command line parser; with `own_only`, only the commands of this file."""
    parser = argparse.ArgumentParser(
        prog="graphc", description="Compile neural networks declared in .nn files.",
        epilog="Run `graphc COMMAND --help` for each command's options.")
    parser.add_argument("--version", action="version", version=f"graphc {graphc.__version__}")
    parser.add_argument("--debug", action="store_true", help="log what the compiler does")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    p = sub.add_parser("check", help="parse and check a .nn file; list its parameters",
                       description="Parse, resolve and shape-check every model and train block "
                                   "of FILE, then print each model's parameters.")
    p.add_argument("file", metavar="FILE")
    _add_model_arg(p)
    p.add_argument("--grad", action="store_true",
                   help="check the derived gradients of the loss against float64 central "
                        "differences at a random point; exit 1 where one is wrong")
    p.add_argument("--backends", metavar="LIST",
                   help="run the forward graph, the gradients and three train steps on each "
                        "backend of LIST (numpy,llvm,cuda or all) and on the reference evaluator, "
                        "from the same random inputs; print each graph's worst difference and "
                        "its tolerance; exit 1 beyond it (docs/backends.md)")
    p.add_argument("--seed", type=int, default=0,
                   help="the random point of --grad, the random inputs of --backends (default 0)")
    p.add_argument("--samples", type=int, default=32, metavar="K",
                   help="elements checked per parameter with --grad (all when fewer; default 32)")
    _add_werror_arg(p)
    p.set_defaults(run=cmd_check)

    p = sub.add_parser("build", help="compile a model into an artifact folder",
                       description="Compile a model and write an artifact: graph.json, "
                                   "params.npz (initialized parameters) and manifest.json. With "
                                   "--backend llvm, every graph's kernels are compiled too.")
    p.add_argument("file", metavar="FILE")
    p.add_argument("-o", "--out", metavar="DIR",
                   help="artifact folder to write (needed unless --stats or --emit-source)")
    _add_model_arg(p)
    p.add_argument("--seed", type=int, help="seed for parameter initialization "
                                            "(default: the train block's, else 0)")
    add_backend_arg(p, precision=True)
    p.add_argument("--verify", action="store_true", help="check IR invariants after every pass")
    p.add_argument("--dump-after", metavar="PASS", action="append", default=[],
                   help="print the IR after a pass, or the kernel plan after `fuse` (repeatable)")
    p.add_argument("--stats", action="store_true",
                   help="report kernels, FLOPs, bytes moved and peak memory of each program")
    p.add_argument("--batch", type=int, metavar="N",
                   help="batch size for --stats (default: the train block's, else 64)")
    p.add_argument("--emit-source", metavar="DIR",
                   help="write the generated code of every graph (LLVM IR with --backend llvm)")
    _add_werror_arg(p)
    p.set_defaults(run=cmd_build)

    p = sub.add_parser("graph", help="print a model's graph, or draw it (DOT, PNG, SVG)",
                       description="Print the IR of a model, one node per line, or draw it: "
                                   "Graphviz DOT, or a PNG or SVG picture (needs Graphviz's "
                                   "`dot`) with nodes coloured by their .nn line, fused kernels "
                                   "framed (after the passes) and shapes on the edges.")
    p.add_argument("file", metavar="FILE")
    _add_model_arg(p)
    p.add_argument("--format", choices=["text", "dot", "png", "svg"], default="text",
                   help="text (default), dot, or a picture: png or svg (needs -o)")
    p.add_argument("--lowered", action="store_true",
                   help="show the graph after the pass pipeline (primitives only)")
    p.add_argument("--backward", action="store_true",
                   help="show the derived backward graph: the loss and d loss / d param for "
                        "every parameter")
    p.add_argument("--train-step", action="store_true",
                   help="show the whole compiled training step: forward in training mode, "
                        "backward, and the optimizer's update of every parameter and its state")
    p.add_argument("--no-kernels", action="store_true",
                   help="do not frame the fused kernels in dot, png and svg drawings")
    p.add_argument("-o", "--out", metavar="PATH", help="write to a file instead of stdout")
    p.set_defaults(run=cmd_graph)

    p = sub.add_parser("run", help="run a built artifact on inputs from .npy/.npz files",
                       description="Run an artifact's forward pass. Inputs are NAME=FILE.npy, "
                                   "or a .npz file whose arrays are named after the inputs.")
    p.add_argument("artifact", metavar="ARTIFACT")
    p.add_argument("--input", "-i", metavar="NAME=FILE", action="append", default=[],
                   help="an input array (repeatable)")
    p.add_argument("-o", "--out", metavar="FILE.npz", help="save the outputs to a .npz file")
    p.set_defaults(run=cmd_run)
    if own_only:
        return parser

    from graphc.train_cli import add_commands
    add_commands(sub)
    from graphc.report_cli import add_commands as add_report
    add_report(sub)
    from graphc.search_cli import add_commands as add_search
    add_search(sub)
    from graphc.onnx.export_cli import add_commands as add_export
    add_export(sub)
    from graphc.onnx.import_cli import add_commands as add_import
    add_import(sub)
    from graphc.time_cli import add_commands as add_time
    add_time(sub)
    from graphc.steps_cli import add_commands as add_sample
    add_sample(sub)
    return parser


# --- commands --------------------------------------------------------------------------------------

def cmd_check(args) -> int:
    from graphc.compiler import check_source, read_source
    checked = check_source(read_source(args.file), args.file)
    report_lints(checked, args.werror)
    if args.grad:
        return _check_gradients(checked, args)
    if args.backends is not None:
        return _check_backends(checked, args)
    names = [args.model] if args.model else list(checked.models)
    if args.model:
        checked.pick(args.model)
    for name in names:
        print(_model_table(checked.models[name]))
        if name in checked.trains:
            print(_train_summary(checked.trains[name]))
        if name in checked.searches:
            print("  search: " + checked.searches[name].summary())
        print()
    print(f"{args.file}: ok ({len(checked.models)} model{'s' if len(checked.models) != 1 else ''})")
    return 0


def _check_gradients(checked, args) -> int:
    from graphc.gradcheck import check_gradients, format_table
    if args.samples < 1:
        raise _usage("--samples must be at least 1")
    try:
        model, results = check_gradients(checked, args.model, args.seed, args.samples)
    except ValueError as err:
        raise error(f"{args.file}: {err}") from None
    print(format_table(model, results))
    wrong = [r.name for r in results if not r.ok]
    if wrong:
        print(f"error: {args.file}: the derived gradient of {', '.join(wrong)} disagrees with finite "
              f"differences (a bug in graphc's gradient rules: please report it)", file=sys.stderr)
        return 1
    return 0


def _check_backends(checked, args) -> int:
    from graphc import selfcheck
    backends, explicit = selfcheck.parse_backends(args.backends)
    name = checked.pick(args.model).name
    print(f"{args.file}: {name} on {', '.join(backends)} against the reference evaluator "
          f"(seed {args.seed}, batch {selfcheck.BATCH})")
    print(selfcheck.HEADER)
    missing = []

    def unavailable(backend: str, why: str) -> None:
        missing.append(backend)
        print(f"{'error' if explicit else 'note'}: cannot check the {backend} backend here: "
              f"{why}", file=sys.stderr)

    results = selfcheck.check_backends(checked, args.model, backends, args.seed,
                                       lambda r: print(selfcheck.format_result(r), flush=True),
                                       unavailable)
    failed = [r for r in results if not r.ok]
    for r in failed:
        what = (f"by {r.difference:.3g}" if r.difference < float("inf") else
                "in its non-finite elements, shape or exact values")
        print(f"error: {args.file}: {r.graph} on the {r.backend} backend differs from the "
              f"reference evaluator {what} in `{r.value}` (tolerance {r.tolerance:.0e})",
              file=sys.stderr)
    if failed or (missing and explicit):
        return 1
    print(f"{args.file}: ok ({len(results)} graph runs within tolerance"
          + (f"; {', '.join(missing)} not available here)" if missing else ")"))
    return 0


def _model_table(model) -> str:
    from graphc.runtime.summary import param_table
    return param_table(model.name, {k: n.type for k, n in model.inputs.items()},
                       {k: n.type for k, n in model.outputs.items()},
                       model.loss.type if model.loss is not None else None,
                       model.params.values())


def _call_text(value: tuple) -> str:
    name, opts = value
    return f"{name}({', '.join(f'{k}={v}' for k, v in opts.items() if v is not None)})"


def _train_summary(train) -> str:
    parts = []
    for key, value in train.items():
        if value is None or value == ():   # a setting that is off (gradient clipping, augment)
            continue
        if key == "augment":                   # a list of calls
            value = "[" + ", ".join(_call_text(v) for v in value) + "]"
        elif isinstance(value, tuple):
            value = _call_text(value)
        parts.append(f"{key}={value}")
    return "  train: " + ", ".join(parts)


def cmd_build(args) -> int:
    if not (args.out or args.stats or args.emit_source):
        raise _usage("build needs -o DIR (or --stats or --emit-source)")
    if args.batch is not None and args.batch < 1:
        raise _usage("--batch must be at least 1")
    # An artifact built before from the same source, options and graphc is copied from the build
    # cache, before the compiler (or numpy) is even imported. Every option that changes the build
    # or its checks is in the key (build_cache.BUILD_OPTIONS); switches that inspect the
    # compilation always compile.
    key = None
    if args.out and not (args.stats or args.emit_source or args.dump_after or args.verify):
        from graphc import build_cache
        try:
            source = Path(args.file).read_bytes()
        except OSError:
            source = None                     # the compiler reports it, with its usual message
        if source is not None:
            options = {name: getattr(args, name) for name in build_cache.BUILD_OPTIONS}
            key = build_cache.build_key(args.file, source, options)
            out = _writable_dir(args.out)
            restored = build_cache.restore(key, out)
            if restored is not None:
                message, warnings = restored
                if warnings:
                    print(warnings, file=sys.stderr)
                print(message.replace(_OUT, str(out)))
                return 0
    from graphc.api import build_program
    from graphc.compiler import check_source, read_source
    from graphc.passes import PipelineOptions, pass_names
    stages = pass_names() + [FUSE_STAGE]
    unknown = [p for p in args.dump_after if p not in stages]
    if unknown:
        raise _usage(f"--dump-after: unknown pass '{unknown[0]}' (passes: {', '.join(stages)})")
    checked = check_source(read_source(args.file), args.file)
    warnings = report_lints(checked, args.werror)
    options = PipelineOptions(verify=args.verify, dump_after=args.dump_after, dump=print)
    program = build_program(checked, args.model, args.backend, args.seed, options)
    program.use_precision(args.precision)
    if FUSE_STAGE in args.dump_after:
        from graphc.backends.kernels import plan_kernels
        from graphc.backends.kernels.printer import format_plan
        for graph_key, graph in program.graphs.items():
            # the plan the backend compiles (llvm's kernels run their points in order)
            plan = plan_kernels(graph, program.updates(graph_key), ordered=program.backend == "llvm")
            print(f"; kernel plan of {graph_key}\n{format_plan(plan)}")
    # Native code for every graph now, into the cache that later runs load it from.
    program.compile(load=False)
    if args.emit_source:
        _emit_source(program, Path(args.emit_source))
    if args.stats:
        _print_stats(program, args.batch)
    count = sum(p.count for p in program.param_info.values())
    if args.out:
        out = _writable_dir(args.out)
        program.save(out)
        message = f"built {program.name} -> {_OUT} ({len(program.graph.nodes())} nodes, {count:,} parameters)"
        print(message.replace(_OUT, str(out)))
        if key is not None:
            from graphc import build_cache
            build_cache.store(key, out, message, warnings, program.cached_code())
    return 0


_OUT = "\0OUT\0"         # where the artifact folder goes in a stored build message


FUSE_STAGE = "fuse"


def _emit_source(program, folder: Path) -> None:
    """The generated code: LLVM IR (llvm) or CUDA C (cuda) of the whole program, one module for
    all its graphs; the kernel plan of each graph on the numpy backend."""
    from graphc.backends.kernels import plan_kernels
    from graphc.backends.kernels.printer import format_plan
    folder = _writable_dir(str(folder))
    folder.mkdir(parents=True, exist_ok=True)
    executors = program._executors
    if all(hasattr(ex, "source") for ex in executors.values()):
        first = next(iter(executors.values()))
        files = {f"{program.name}{first.source_suffix}": first.source()}
    else:
        files = {f"{program.name}.{key}.plan": format_plan(plan_kernels(ex.graph, program.updates(key)))
                 for key, ex in executors.items()}
    for name, text in files.items():
        (folder / name).write_text(text)
        print(f"wrote {folder / name}")


def _print_stats(program, batch: int | None) -> None:
    from graphc.backends.kernels import plan_kernels
    from graphc.backends.kernels.memory import plan_stats
    train = program.meta.get("train") or {}
    n = batch or int(train.get("batch") or 64)
    rows = [("program", "kernels", "MFLOP", "MB moved", "peak MB", "temps MB", "unplanned MB", "nodes")]
    for key, graph in program.graphs.items():
        # the llvm backend's plan (its kernels run their points in order: col2im in one pass)
        plan = plan_kernels(graph, program.updates(key), ordered=program.backend == "llvm")
        stats = plan_stats(plan, dict.fromkeys(plan.symbols, n))
        rows.append((key, str(stats["kernels"]), f"{stats['flops'] / 1e6:.2f}",
                     f"{stats['bytes_moved'] / 1e6:.2f}", f"{stats['peak_bytes'] / 1e6:.2f}",
                     f"{stats['arena_bytes'] / 1e6:.2f}", f"{stats['temp_bytes_unplanned'] / 1e6:.2f}",
                     str(len(graph.nodes()))))
    widths = [max(len(r[c]) for r in rows) for c in range(len(rows[0]))]
    print(f"{program.name} at batch {n} (fused kernels; peak = parameters, state, inputs and the "
          f"temporaries' arena; unplanned = the temporaries without buffer reuse):")
    for r in rows:
        cells = [v.ljust(w) if c == 0 else v.rjust(w) for c, (v, w) in enumerate(zip(r, widths))]
        print("  " + "  ".join(cells))


def cmd_graph(args) -> int:
    from graphc.compiler import check_source, lower, lower_derived, model_graph, read_source
    from graphc.ir.printer import format_graph
    if args.format in ("png", "svg") and not args.out:
        raise _usage(f"--format {args.format} needs -o OUT.{args.format}")
    source = read_source(args.file)
    checked = check_source(source, args.file)
    model = checked.pick(args.model)
    graph = model_graph(model)
    lowered = args.train_step or args.backward or args.lowered
    if args.train_step:
        from graphc.compiler import program_graphs
        if model.name not in checked.trains or model.loss is None:
            raise error(f"model '{model.name}' has no " +
                        ("loss" if model.loss is None else "train block"), file=args.file,
                        hint="a training step needs a loss and a `train` block with an optimizer")
        graph = program_graphs(model, checked.trains[model.name])[0]["train_step"]
    elif args.backward:
        from graphc.autodiff import backward_graph
        if model.loss is None:
            raise error(f"model '{model.name}' has no loss to differentiate", file=args.file,
                        hint="declare one: loss = ...")
        graph = lower_derived(backward_graph(lower(graph)))
    elif args.lowered:
        graph = lower(graph)
    if args.format == "text":
        text = format_graph(graph) + "\n"
    else:
        text = _graph_drawing(graph, lowered and not args.no_kernels, {args.file: source.splitlines()})
    if args.format in ("png", "svg"):
        from graphc.draw import render
        render(text, args.format, Path(args.out))
    elif args.out:
        Path(args.out).write_text(text)
    else:
        sys.stdout.write(text)
    return 0


def _graph_drawing(graph, kernels: bool, sources: dict[str, list[str]]) -> str:
    """DOT text of a graph; after the passes, with the kernel plan's fused kernels as clusters
    (before them the graph still has composite ops, which have no kernels)."""
    from graphc.draw import graph_dot
    plan = None
    if kernels:
        from graphc.backends.kernels import plan_kernels
        plan = plan_kernels(graph)
    return graph_dot(graph, plan, sources)


def cmd_run(args) -> int:
    import numpy as np

    from graphc.runtime import load_artifact
    program = load_artifact(args.artifact)
    inputs: dict[str, np.ndarray] = {}
    for spec in args.input:
        if "=" in spec:
            name, path = spec.split("=", 1)
            if not name:
                raise _usage(f"--input {spec}: expected NAME=FILE.npy")
            inputs[name] = load_array(path)
        else:
            inputs.update(load_npz(spec))
    try:
        outputs = program.forward(**inputs)
    except ValueError as err:
        raise error(f"{args.artifact}: {err}") from None
    if args.out:
        np.savez(args.out, **outputs)
        print(f"wrote {', '.join(outputs)} to {args.out}")
    else:
        with np.printoptions(precision=4, suppress=True, threshold=50, edgeitems=3):
            for name, value in outputs.items():
                print(f"{name}: {value.dtype}{list(value.shape)}\n{value}")
    return 0




def _writable_dir(path: str) -> Path:
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise error(f"{out}: exists and is not a folder")
    return out


class _UsageError(Exception):
    pass


def _usage(message: str) -> _UsageError:
    return _UsageError(message)


def _command_word(argv: list[str]) -> str | None:
    """The command the arguments name: the first that is not an option (graphc's own options
    take no values)."""
    return next((a for a in argv if not a.startswith("-")), None)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = make_parser(own_only=_command_word(argv) in OWN_COMMANDS)
    args = parser.parse_args(argv)
    args.argv = argv          # what `graphc train --ranks N` runs again under mpiexec
    configure_logging(args.debug)
    try:
        return args.run(args)
    except GraphcError as err:
        print(err.render(), file=sys.stderr)
        return 1
    except _UsageError as err:
        parser.print_usage(sys.stderr)
        print(f"graphc: error: {err}", file=sys.stderr)
        return 2
    except BrokenPipeError:
        return 0
    except KeyboardInterrupt:
        print("graphc: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # a bug in graphc, not a user mistake
        if args.debug or os.environ.get("GRAPHC_DEBUG"):
            raise
        print(f"graphc: internal error: {type(err).__name__}: {err}\n"
              f"(this is a bug in graphc; rerun with --debug for a traceback)", file=sys.stderr)
        return 70


if __name__ == "__main__":
    sys.exit(main())
