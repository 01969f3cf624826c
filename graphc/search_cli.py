"""The `graphc search` command: run a file's search block on a Dask cluster, print the ranked
trials, and with --out record every trial and write the best configuration as a .nn file."""
from __future__ import annotations

import sys
import textwrap
import time
from pathlib import Path

from graphc.cli_types import at_least, natural, positive
from graphc.errors import error
from graphc.frontend.search_spec import METHODS, METRICS

# Flags that change what is searched: a resumed search keeps what it was started with.
_SEARCH_FLAGS = ("trials", "method", "rounds", "keep", "metric", "seed", "halving")


def add_commands(sub) -> None:
    p = sub.add_parser("search", help="search hyperparameters on a Dask cluster",
                       description="Run the trials of FILE.nn's search block on Dask distributed "
                                   "(a local cluster, or --scheduler), print them ranked, and "
                                   "with --out record every trial and the best configuration.")
    p.add_argument("file", metavar="FILE.nn", nargs="?",
                   help="the file with the search block (leave out with --resume)")
    p.add_argument("--model", metavar="NAME", help="which model's search, when there are several")
    p.add_argument("--out", metavar="DIR", help="write search.json, results.jsonl, results.csv "
                                                "and best.nn here, each trial as it finishes")
    p.add_argument("--resume", metavar="DIR", help="continue an interrupted search: run only "
                                                   "the trials missing from DIR")
    p.add_argument("--scheduler", metavar="tcp://HOST:PORT",
                   help="run on this Dask scheduler's workers (default: a local cluster)")
    p.add_argument("--workers", type=positive, metavar="N",
                   help="local cluster: worker processes, one trial each (default: one per core)")
    p.add_argument("--trials", type=positive, metavar="N", help="override: trials per round")
    p.add_argument("--method", choices=METHODS, help="override the search method")
    p.add_argument("--rounds", type=positive, metavar="R", help="override: coarse-to-fine rounds")
    p.add_argument("--keep", type=positive, metavar="K",
                   help="override: the best trials each coarse-to-fine round re-centres on")
    p.add_argument("--metric", choices=list(METRICS), help="override the metric")
    p.add_argument("--seed", type=natural, metavar="S", help="override the search seed")
    p.add_argument("--halving", type=at_least(2), metavar="ETA",
                   help="successive halving: keep the best 1/ETA of the trials at each milestone")
    p.add_argument("--data-dir", metavar="DIR",
                   help="folder of the MNIST/Fashion-MNIST files (default: $GRAPHC_DATA)")
    p.add_argument("--quiet", action="store_true", help="no line per finished trial")
    from graphc.cli_common import add_backend_arg
    add_backend_arg(p)
    p.set_defaults(run=cmd_search)


def cmd_search(args) -> int:
    from graphc.search import Search, dask_client
    from graphc.search_results import format_table
    if args.scheduler and args.workers:
        raise error("--workers sizes the local cluster; with --scheduler the cluster's own "
                    "workers run the trials")
    plan, folder = _resume(args) if args.resume else _start(args)
    on_result = None if args.quiet else _print_result
    if not args.quiet:
        where = args.scheduler or f"a local cluster of {args.workers or 'one worker per core'}"
        config = plan.config
        print(f"searching {plan.model} ({config.method}, {config.trials} trials"
              f"{f' x {config.rounds} rounds' if config.rounds > 1 else ''}, metric "
              f"{config.metric}, seed {config.seed}) on {where}", flush=True)
    start = time.perf_counter()
    with dask_client(args.scheduler, args.workers) as client:
        if not client.scheduler_info()["workers"]:
            print(f"graphc: {args.scheduler} has no workers yet; the trials wait for some "
                  f"(start them with `dask worker {args.scheduler}`)", file=sys.stderr)
        search = Search(plan, client, folder, on_result)
        try:
            ranked = search.run()
        except KeyboardInterrupt:
            done = len(search.results)
            print(f"\ngraphc: interrupted after {done} finished job{'s' if done != 1 else ''}"
                  + (f"; continue with graphc search --resume {folder.path}" if folder else ""),
                  file=sys.stderr)
            return 130
    print(format_table(ranked, plan.config, plan.epochs))
    print(f"{len(ranked)} trials, {len(search.ran)} training runs this time, in "
          f"{time.perf_counter() - start:.1f}s")
    if folder is not None:
        best = write_best(plan, folder, ranked)
        print(f"results in {folder.path}" + (f"; best configuration: {best}" if best else ""))
    return 0


def _start(args):
    from graphc.compiler import check_source, read_source
    from graphc.search_results import SearchFolder
    if args.file is None:
        raise error("graphc search needs a .nn file with a search block, or --resume DIR")
    source = read_source(args.file)
    checked = check_source(source, args.file)
    plan = make_plan(checked, source, args.file, args.model, _overrides(args),
                     Path(args.file).parent, args.data_dir, args.backend)
    folder = None
    if args.out:
        folder = SearchFolder(args.out)
        folder.create({"path": args.file, "model": plan.model, "source": source,
                       "overrides": _overrides(args), "config": plan.config.to_json(),
                       "base_dir": plan.base_dir, "data_dir": plan.data_dir,
                       "backend": plan.backend})
    return plan, folder


def _resume(args):
    from graphc.compiler import check_source
    from graphc.search_results import SearchFolder
    for flag in ("file", "out", "model", *_SEARCH_FLAGS):
        if getattr(args, flag) is not None:
            raise error(f"--resume continues a search exactly as it was started; "
                        f"{'FILE' if flag == 'file' else '--' + flag} cannot be given with it",
                        hint="only --scheduler, --workers, --data-dir, --backend and --quiet "
                             "may change")
    folder = SearchFolder(args.resume)
    meta = folder.meta()
    checked = check_source(meta["source"], meta["path"])
    plan = make_plan(checked, meta["source"], meta["path"], meta["model"], meta["overrides"],
                     meta["base_dir"], args.data_dir or meta.get("data_dir"), args.backend)
    return plan, folder


def _overrides(args) -> dict:
    return {k: getattr(args, k) for k in _SEARCH_FLAGS if getattr(args, k) is not None}


def make_plan(checked, source: str, path: str, model: str | None, overrides: dict, base_dir,
              data_dir: str | None = None, backend: str = "numpy"):
    """The plan of a checked file's search (the one of `model`, or the only one), after
    command-line overrides."""
    from graphc.frontend.search_spec import resolve
    from graphc.search import Plan
    if model is None:
        if len(checked.searches) != 1:
            raise error(f"{path}: " + ("no search block" if not checked.searches else
                                       f"search blocks for {', '.join(checked.searches)}; "
                                       f"choose one with --model"),
                        hint=None if checked.searches else
                        "add one, for example search MODEL { lr = loguniform(1e-4, 1e-1) }")
        model = next(iter(checked.searches))
    if model not in checked.searches:
        raise error(f"{path}: no search block for model '{model}'")
    config = resolve(checked.searches[model], checked.src, **overrides)
    if config.metric == "val_accuracy":
        from graphc.compiler import task_of
        if task_of(checked.models[model]).get("kind") != "classification":
            raise checked.src.error(f"metric val_accuracy needs a classifier; {model} is not one",
                                    config.locs.get("metric", config.block),
                                    "use metric = val_loss")
    epochs = checked.trains[model].epochs
    return Plan(source, str(path), model, config, epochs, str(Path(base_dir).resolve()),
                str(Path(data_dir).resolve()) if data_dir else None, backend)


def write_best(plan, folder, ranked: list[dict]) -> Path | None:
    """best.nn: the source with the best finished trial's values; None when every trial failed."""
    from graphc.frontend.parser import parse
    from graphc.frontend.search_spec import best_source
    best = next((r for r in ranked if r["status"] == "ok"), None)
    if best is None:
        return None
    values = ", ".join(f"{k} = {v}" for k, v in best["params"].items())
    note = (f"The best of {len(ranked)} trials of `graphc search {plan.path}`: trial "
            f"{best['trial']}, {plan.config.metric} {best.get(plan.config.metric):.4g}, with "
            f"{values}. It trained with seed {best['seed']} on the data split of the train "
            f"block's seed; `graphc train` uses that seed for both.")
    header = textwrap.fill(note, 99, initial_indent="# ", subsequent_indent="# ") + "\n"
    text = best_source(plan.source, parse(plan.source, plan.path), plan.model, plan.config.space,
                       best["params"], header)
    return folder.write_best(text)


def _print_result(record: dict) -> None:
    values = ", ".join(f"{k}={v}" for k, v in record["params"].items())
    what = f"trial {record['trial']} ({values}), {record['epochs']} epochs"
    if record["status"] == "ok":
        acc = record.get("val_accuracy")
        print(f"{what}: val loss {record['val_loss']:.4f}"
              + ("" if acc is None else f", val accuracy {100 * acc:.2f}%")
              + f" [{record['seconds']:.1f}s]", flush=True)
    else:
        first = (record.get("error") or "").splitlines()[0] if record.get("error") else ""
        again = ", retrying once" if record["status"] == "retrying" else ""
        print(f"{what}: failed{again}: {first}", flush=True)
