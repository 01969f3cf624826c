"""Hyperparameter search on Dask distributed: the trials of a search block (random, grid or coarse
to fine, optionally with successive halving), each trained by the ordinary training loop on a
Dask worker with its own seed derived from the search seed, so that a local cluster and a remote
one give the same results. Every finished trial is recorded at once (search_results.py), so an
interrupted search resumes with only the missing trials."""
from __future__ import annotations

import contextlib
import itertools
import logging
import math
import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from graphc.errors import GraphcError, error
from graphc.frontend.search_spec import Dimension, SearchConfig, apply_params
from graphc.search_results import SearchFolder, rank

# Fault injection for the tests: a trial whose id names a file in this folder deletes the file
# and kills its own worker process (SIGKILL, no cleanup): a crash that a retry gets past.
FAULT_DIR = "GRAPHC_FAULT_SEARCH_DIR"
SHRINK = 0.5    # a coarse-to-fine round's window is this fraction of the last round's


@dataclass(frozen=True)
class Trial:
    """One point of the space, with the seed it trains with (initialization, shuffling, dropout)."""
    round: int
    index: int
    seed: int
    params: dict[str, Any]

    @property
    def id(self) -> str:
        return f"{self.round}.{self.index}"


@dataclass(frozen=True)
class Plan:
    """Everything a worker needs to train a trial: the source itself travels, not its path."""
    source: str
    path: str
    model: str
    config: SearchConfig
    epochs: int                  # the train block's
    base_dir: str                # where relative data paths resolve (absolute)
    data_dir: str | None = None
    backend: str = "numpy"


# --- the space ------------------------------------------------------------------------------------

def trial_seeds(search_seed: int, round_: int, index: int) -> tuple[int, np.random.Generator]:
    """The training seed of a trial and the generator that samples its values: both from the
    search seed, the round and the index alone, never from the order trials finish in."""
    words = np.random.SeedSequence([search_seed, round_, index]).generate_state(2)
    return int(words[0] >> 1), np.random.default_rng(int(words[1]))


def sample(space: dict[str, Dimension], rng: np.random.Generator) -> dict[str, Any]:
    """One value per dimension, in declaration order; continuous values keep 3 significant digits
    (a finer grain than any search resolves, and values that read well in the results)."""
    values = {}
    for name, dim in space.items():
        if dim.kind == "choice":
            values[name] = dim.values[int(rng.integers(len(dim.values)))]
            continue
        u = rng.random()
        if dim.kind == "loguniform":
            value = math.exp(math.log(dim.low) + u * (math.log(dim.high) - math.log(dim.low)))
        else:
            value = dim.low + u * (dim.high - dim.low)
        value = min(max(float(f"{value:.3g}"), dim.low), dim.high)
        values[name] = int(round(value)) if dim.integer else value
    return values


def grid(space: dict[str, Dimension]) -> list[dict[str, Any]]:
    return [dict(zip(space, combo)) for combo in itertools.product(*(d.values for d in space.values()))]


def narrow(space: dict[str, Dimension], original: dict[str, Dimension],
           best: list[dict[str, Any]]) -> dict[str, Dimension]:
    """The next coarse-to-fine window: centred on the mean (geometric for loguniform) of the best
    trials' values, SHRINK times as wide as the last one, moved inside the original bounds; a
    choice keeps the values the best trials used."""
    narrowed = {}
    for name, dim in space.items():
        values = [p[name] for p in best]
        if dim.kind == "choice":
            narrowed[name] = replace(dim, values=tuple(v for v in dim.values if v in values))
            continue
        log = dim.kind == "loguniform"
        to, back = (math.log, math.exp) if log else (float, float)
        centre = sum(to(v) for v in values) / len(values)
        half = SHRINK * (to(dim.high) - to(dim.low)) / 2
        lo_bound, hi_bound = to(original[name].low), to(original[name].high)
        low = min(max(centre - half, lo_bound), hi_bound - 2 * half)
        narrowed[name] = replace(dim, low=float(f"{back(low):.6g}"),
                                 high=float(f"{back(low + 2 * half):.6g}"))
    return narrowed


def budgets(epochs: int, trials: int, eta: int | None) -> list[int]:
    """Successive halving's milestones (epochs), last the full run: every trial trains to the
    first, the best 1/eta of them to the next, and so on."""
    if eta is None:
        return [epochs]
    levels = 0
    while epochs // eta ** (levels + 1) >= 1 and trials // eta ** (levels + 1) >= 1:
        levels += 1
    return sorted({epochs // eta ** k for k in range(levels + 1)})


# --- one trial, on a worker -----------------------------------------------------------------------

def run_trial(job: dict) -> dict:
    """Build the model with the trial's values and train it with the ordinary training loop:
    the train block's data split (the same for every trial, so that they are compared on the
    same validation set), the trial's seed for initialization, shuffling and dropout."""
    _fault(job["trial"])
    with _one_blas_thread():
        return _train(job)


def _one_blas_thread():
    """One trial per core: BLAS gets one thread, as under a Dask nanny, also on a worker started
    without one (and so the same sums in the same order on every cluster)."""
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:      # no scikit-learn: rely on the nanny's OMP_NUM_THREADS=1
        return contextlib.nullcontext()
    return threadpool_limits(1, user_api="blas")


def _train(job: dict) -> dict:
    from graphc.api import build_program
    from graphc.compiler import check_source
    from graphc.runtime.train import Trainer, TrainSettings, prepare_data
    start = time.perf_counter()
    record = {k: job[k] for k in ("trial", "round", "index", "seed", "params", "epochs")}
    try:
        checked = check_source(job["source"], job["path"])
        model = job["model"]
        space = checked.searches[model].space
        checked.trains[model] = apply_params(checked.trains[model], space, job["params"])
        program = build_program(checked, model, job["backend"], seed=job["seed"])
        # `epochs` is the milestone, unless the trial itself sets the epochs (no halving then).
        block = TrainSettings.of(program, epochs=None if "epochs" in job["params"] else
                                 job["epochs"])
        data = prepare_data(program, block, job["data_dir"], job["base_dir"])
        trainer = Trainer(program, replace(block, seed=job["seed"]), data)
        scores = trainer.fit()
    except GraphcError as err:
        return {**record, "status": "failed", "error": str(err),
                "seconds": round(time.perf_counter() - start, 3)}
    history = trainer.loop.history
    return {**record, "status": "ok", "val_loss": scores["val"]["loss"],
            "val_accuracy": scores["val"].get("accuracy"), "test_loss": scores["test"]["loss"],
            "test_accuracy": scores["test"].get("accuracy"),
            "loss": history[-1]["loss"] if history else None, "epochs_run": trainer.loop.epoch,
            "best_epoch": trainer.loop.best_epoch, "stopped_early": trainer.loop.stopped_early,
            "history": history, "seconds": round(time.perf_counter() - start, 3)}


def _fault(trial: str) -> None:
    folder = os.environ.get(FAULT_DIR)
    if folder and os.path.exists(os.path.join(folder, trial)):
        os.remove(os.path.join(folder, trial))
        os.kill(os.getpid(), signal.SIGKILL)


# --- the cluster ----------------------------------------------------------------------------------

@contextlib.contextmanager
def dask_client(scheduler: str | None = None, workers: int | None = None) -> Iterator[Any]:
    """A Dask client: of the scheduler at `scheduler` (tcp://HOST:PORT), or of a local cluster
    of `workers` single-threaded worker processes (default: one per core)."""
    try:
        import dask
        from distributed import Client, LocalCluster
    except ImportError:
        raise error("graphc search runs on Dask distributed, which is not installed",
                    hint="pip install -e '.[search]' (from graphc's clone)") from None
    if scheduler is not None:
        try:
            client = Client(scheduler, timeout="10s")
        except (OSError, TimeoutError) as err:
            raise error(f"cannot reach the Dask scheduler at {scheduler} ({err})",
                        hint="start one with `dask scheduler`, and workers with "
                             "`dask worker tcp://HOST:PORT`") from None
        with client:
            yield client
        return
    # A killed trial fails at once (and graphc retries it once) instead of being re-run by the
    # scheduler three times first. The scheduler's web server takes any free port, since
    # another cluster may hold Dask's usual 8787.
    with dask.config.set({"distributed.scheduler.allowed-failures": 0}), _environment_kept(), \
            LocalCluster(n_workers=workers or os.cpu_count() or 1, threads_per_worker=1,
                         processes=True, dashboard_address="127.0.0.1:0",
                         silence_logs=logging.ERROR) as cluster, Client(cluster) as client:
        yield client


@contextlib.contextmanager
def _environment_kept() -> Iterator[None]:
    """Dask's nannies set OMP_NUM_THREADS=1, OPENBLAS_NUM_THREADS=1, PYTHONHASHSEED and more in
    *this* process's environment for the workers they spawn, and leave them there: every process
    started later (a training run, a test's subprocess) would then sum in another order than this
    one. They are put back once the cluster is closed."""
    saved = dict(os.environ)
    try:
        yield
    finally:
        os.environ.clear()
        os.environ.update(saved)


# --- the search -----------------------------------------------------------------------------------

class Search:
    """Runs a plan's trials on a Dask client, round by round and milestone by milestone; each
    finished job (a trial trained to a number of epochs) is reported to `on_result` and saved
    to `folder` at once. Jobs already in the folder are not run again."""

    def __init__(self, plan: Plan, client, folder: SearchFolder | None = None,
                 on_result: Callable[[dict], None] | None = None):
        self.plan, self.client, self.folder = plan, client, folder
        self.on_result = on_result or (lambda record: None)
        self.results: dict[tuple[str, int], dict] = {}
        self.ran: list[tuple[str, int]] = []        # the jobs this session ran (not resumed)
        if folder is not None:
            for record in folder.load_results():
                self.results[(record["trial"], record["epochs"])] = record

    def run(self) -> list[dict]:
        """Every trial's final record, best first."""
        config = self.plan.config
        space = config.space
        for round_ in range(1, config.rounds + 1):
            if round_ > 1:      # the rounds before this one only, also when resuming
                before = [r for r in self.final() if r["round"] < round_]
                best = [r["params"] for r in rank(before, config)[:config.keep]
                        if r["status"] == "ok"]
                if best:
                    space = narrow(space, config.space, best)
            alive = self.trials(round_, space)
            milestones = budgets(self.plan.epochs, len(alive), config.halving)
            for i, epochs in enumerate(milestones):
                records = self.run_jobs(alive, epochs)
                if i + 1 < len(milestones):
                    keep = {r["trial"] for r in rank(records, config)[:max(1, len(alive) //
                                                                             config.halving)]
                            if r["status"] == "ok"}
                    alive = [t for t in alive if t.id in keep]
        return rank(self.final(), config)

    def trials(self, round_: int, space: dict[str, Dimension]) -> list[Trial]:
        config = self.plan.config
        if config.method == "grid":
            points = grid(space)
            return [Trial(round_, i, trial_seeds(config.seed, round_, i)[0], p)
                    for i, p in enumerate(points)]
        trials = []
        for i in range(config.trials):
            seed, rng = trial_seeds(config.seed, round_, i)
            trials.append(Trial(round_, i, seed, sample(space, rng)))
        return trials

    def final(self) -> list[dict]:
        """Each trial's record at the most epochs it was trained to."""
        last: dict[str, dict] = {}
        for (trial, epochs), record in self.results.items():
            if trial not in last or epochs > last[trial]["epochs"]:
                last[trial] = record
        return list(last.values())

    def run_jobs(self, trials: list[Trial], epochs: int) -> list[dict]:
        """Train `trials` to `epochs`, those not done already; a failure is retried once."""
        from distributed import as_completed
        pending = {}
        for t in trials:
            done = self.results.get((t.id, epochs))
            if done is None or done["params"] != t.params:     # a record of another search
                pending[self.submit(t, epochs, 1)] = (t, 1)
        queue = as_completed(list(pending))
        try:
            for future in queue:
                trial, attempt = pending.pop(future)
                record = self.collect(future, trial, epochs)
                record["attempts"] = attempt
                if record["status"] == "failed" and attempt == 1:
                    self.on_result({**record, "status": "retrying"})
                    retry = self.submit(trial, epochs, 2)
                    pending[retry] = (trial, 2)
                    queue.add(retry)
                    continue
                self.record(record)
        finally:
            if pending:        # interrupted: nothing half-done keeps running on the cluster
                self.client.cancel(list(pending))
        return [self.results[(t.id, epochs)] for t in trials]

    def submit(self, trial: Trial, epochs: int, attempt: int):
        p = self.plan
        job = {"source": p.source, "path": p.path, "model": p.model, "base_dir": p.base_dir,
               "data_dir": p.data_dir, "backend": p.backend, "trial": trial.id,
               "round": trial.round, "index": trial.index, "seed": trial.seed,
               "params": trial.params, "epochs": epochs}
        key = f"graphc-trial-{trial.id}-{epochs}-{attempt}-{uuid.uuid4().hex[:8]}"
        return self.client.submit(run_trial, job, key=key, pure=False, retries=0)

    @staticmethod
    def collect(future, trial: Trial, epochs: int) -> dict:
        """The trial's record, or a failed one when its worker died or the task raised."""
        try:
            return future.result()
        except Exception as err:     # a killed worker (KilledWorker) or a bug: the trial failed
            return {"trial": trial.id, "round": trial.round, "index": trial.index,
                    "seed": trial.seed, "params": trial.params, "epochs": epochs,
                    "status": "failed", "error": f"{type(err).__name__}: {err}"}

    def record(self, record: dict) -> None:
        key = (record["trial"], record["epochs"])
        self.results[key] = record
        self.ran.append(key)
        if self.folder is not None:
            self.folder.append(record, self.final(), self.plan.config)
        self.on_result(record)
