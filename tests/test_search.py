"""graphc search: the search block and its errors, deterministic seeds and sampling, and real
searches on Dask distributed: a local cluster, a scheduler and two workers started as separate
processes on loopback (same results for the same seed), resuming an interrupted search, and a
killed trial retried once."""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from graphc.compiler import check_source
from graphc.errors import GraphcError
from graphc.frontend.parser import parse
from graphc.search import FAULT_DIR, Search, budgets, narrow, sample, trial_seeds
from graphc.search_cli import add_commands, make_plan
from graphc.search_results import SearchFolder

pytest.importorskip("distributed")
pytest.importorskip("sklearn")

TINY = """\
model tiny {
    input x: f32[N, 64]
    input y: i64[N]
    logits = x -> linear(16) -> relu -> linear(10)
    output probs = softmax(logits, axis=1)
    loss = cross_entropy(logits, y)
}

train tiny {
    data = digits
    scale = standardize
    optimizer = adam(lr=1e-3)
    batch = 64
    epochs = 2
    seed = 3
}

search tiny {
    lr = loguniform(1e-3, 1e-1)
    batch = choice(32, 64)
    trials = 4
    seed = 7
}
"""
METRICS = ("val_loss", "val_accuracy", "test_loss", "loss", "seed", "params", "epochs")


def checked_of(text: str, path: str = "s.nn"):
    return check_source(text, path)


def errors_of(text: str) -> str:
    with pytest.raises(GraphcError) as info:
        check_source(text, "s.nn")
    return str(info.value)


def with_search(body: str, optimizer: str = "adam(lr=1e-3)") -> str:
    head = TINY[:TINY.index("train tiny")]
    return (head + f"train tiny {{ optimizer = {optimizer}; epochs = 2 }}\n"
            f"search tiny {{\n    {body}\n}}\n")


def plan_of(text: str, tmp_path: Path, **overrides):
    checked = checked_of(text, str(tmp_path / "s.nn"))
    return make_plan(checked, text, str(tmp_path / "s.nn"), None, overrides, tmp_path)


# --- the block -------------------------------------------------------------------------------------

def test_search_block_is_checked_into_a_config():
    config = checked_of(TINY).searches["tiny"]
    assert config.method == "random" and config.trials == 4 and config.seed == 7
    assert config.metric == "val_loss" and config.rounds == 1 and config.halving is None
    lr, batch = config.space["lr"], config.space["batch"]
    assert (lr.kind, lr.low, lr.high, lr.optimizer) == ("loguniform", 1e-3, 1e-1, True)
    assert (batch.kind, batch.values, batch.integer, batch.optimizer) == ("choice", (32, 64),
                                                                          True, False)
    assert config.summary() == ("lr=loguniform(0.001, 0.1), batch=choice(32, 64); random, "
                                "4 trials, metric val_loss, seed 7")


def test_search_defaults_to_the_train_blocks_seed_and_grid_counts_combinations():
    config = checked_of(with_search("batch = choice(16, 32, 64); lr = choice(0.1, 0.01)\n"
                                    "method = grid")).searches["tiny"]
    assert config.trials == 6 and config.seed == 0
    config = checked_of(with_search("lr = uniform(0.01, 0.1); method = coarse_to_fine; "
                                    "trials = 5; keep = 2")).searches["tiny"]
    assert (config.rounds, config.keep) == (2, 2)


@pytest.mark.parametrize("body, message", [
    ("lr = loguniform(0, 1)", "s.nn:11:21: error: lr (option of adam) must be > 0, got 0"),
    ("lr = loguniform(0.1, 0.01)", "the low bound must be below the high bound"),
    ("lr = 0.1", "lr: a search space is choice(...), uniform(low, high) or loguniform"),
    ("momentum = uniform(0, 0.9)",
     "hint: momentum is an option of sgd and rmsprop; this train block's optimizer is adam"),
    ("lr = normal(0, 1)", "lr: a search space is choice"),
    ("seed = choice(1, 2)", "seed is the search seed, not a hyperparameter: it takes one value"),
    ("trials = 2.5", "s.nn:11:14: error: trials must be an integer, got 2.5"),
    ("batch = choice(32, 0)", "batch (train setting) must be >= 1, got 0"),
    ("bacth = choice(32)", "hint: did you mean 'batch'?"),
    ("lr = loguniform(1e-3, 1e-1); method = grid", "s.nn:11:5: error: grid search runs listed "
                                                   "values: lr is loguniform(0.001, 0.1)"),
    ("batch = choice(8, 16); method = grid; trials = 3", "it takes no trials"),
    ("lr = uniform(0.01, 0.1); rounds = 3", "rounds applies to method = coarse_to_fine"),
    ("lr = uniform(0.01, 0.1); method = coarse_to_fine; trials = 2; keep = 3",
     "keep (3) is more than the trials per round (2)"),
    ("lr = uniform(0.01, 0.1); metric = accuracy", "metric: unknown value 'accuracy'"),
    ("epochs = choice(1, 2); halving = 2", "epochs cannot be searched with it"),
    ("method = random", "search tiny: nothing to search"),
    ("lr = uniform(0.01, 0.1); lr = uniform(0.1, 0.2)", "'lr' is set twice (first at line 11)"),
])
def test_search_block_errors(body, message):
    assert message in errors_of(with_search(body))


def test_search_needs_a_model_with_a_train_block():
    head = TINY[:TINY.index("train tiny")]
    assert "s.nn:9:8: error: search block for model 'tiny', which has no train block" in \
        errors_of(head + "search tiny { lr = uniform(0.1, 0.2) }")
    assert "search block for unknown model 'tinny'" in errors_of(TINY + "search tinny { }")
    assert "a second search block for model 'tiny'" in errors_of(TINY + TINY[TINY.index("search"):])


def test_command_line_overrides_are_checked_like_the_block(tmp_path):
    plan = plan_of(TINY, tmp_path, trials=2, method="random", seed=1)
    assert (plan.config.trials, plan.config.seed, plan.epochs) == (2, 1, 2)
    with pytest.raises(GraphcError, match="grid search runs listed values: lr is loguniform"):
        plan_of(TINY, tmp_path, method="grid")


# --- seeds and the space ---------------------------------------------------------------------------

def test_trial_seeds_and_samples_depend_only_on_the_search_seed_and_position():
    space = checked_of(TINY).searches["tiny"].space
    first = [(trial_seeds(7, 1, i)[0], sample(space, trial_seeds(7, 1, i)[1])) for i in range(20)]
    again = [(trial_seeds(7, 1, i)[0], sample(space, trial_seeds(7, 1, i)[1])) for i in range(20)]
    assert first == again
    assert len({seed for seed, _ in first}) == 20                  # each trial its own seed
    assert trial_seeds(8, 1, 0)[0] != first[0][0] and trial_seeds(7, 2, 0)[0] != first[0][0]
    assert all(1e-3 <= p["lr"] <= 1e-1 and p["batch"] in (32, 64) for _, p in first)
    assert {p["batch"] for _, p in first} == {32, 64}


def test_coarse_to_fine_narrows_around_the_best_and_halving_milestones():
    space = checked_of(TINY).searches["tiny"].space
    best = [{"lr": 0.01, "batch": 64}, {"lr": 0.02, "batch": 64}]
    narrowed = narrow(space, space, best)
    assert narrowed["batch"].values == (64,)
    lo, hi = narrowed["lr"].low, narrowed["lr"].high
    assert hi / lo == pytest.approx((1e-1 / 1e-3) ** 0.5, rel=1e-4)     # half as wide (log scale)
    assert lo < (0.01 * 0.02) ** 0.5 < hi                             # around the best
    edge = narrow(space, space, [{"lr": 0.1, "batch": 32}])["lr"]
    assert edge.high == pytest.approx(0.1) and edge.low == pytest.approx(0.01)   # inside bounds
    assert budgets(12, 9, 3) == [1, 4, 12] and budgets(12, 2, 3) == [12]
    assert budgets(5, 8, None) == [5]


# --- real searches ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def faults(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("faults")
    old = os.environ.get(FAULT_DIR)
    os.environ[FAULT_DIR] = str(folder)     # before the workers start: they inherit it
    yield folder
    if old is None:
        os.environ.pop(FAULT_DIR)
    else:
        os.environ[FAULT_DIR] = old


@pytest.fixture(scope="module")
def client(faults):
    from graphc.search import dask_client
    with dask_client(workers=2) as c:
        yield c


def run_search(plan, client, folder=None, on_result=None):
    search = Search(plan, client, folder, on_result)
    return search, search.run()


def essentials(records):
    return sorted((r["trial"], *(r.get(k) for k in METRICS)) for r in records)


@pytest.fixture(scope="module")
def local_search(client, tmp_path_factory):
    """The tiny search on the local cluster, with an output folder."""
    tmp_path = tmp_path_factory.mktemp("local")
    plan = plan_of(TINY, tmp_path)
    folder = SearchFolder(tmp_path / "out")
    folder.create({})
    search, ranked = run_search(plan, client, folder)
    return plan, folder, search, ranked


def test_a_local_cluster_leaves_this_process_environment_as_it_was():
    """Dask's nannies set OPENBLAS_NUM_THREADS=1 (and more) here for their workers; left in place,
    every later subprocess would run BLAS with another thread count, so other sums."""
    from graphc.search import dask_client
    before = dict(os.environ)
    with dask_client(workers=1) as client:
        assert client.submit(lambda: os.environ.get("OPENBLAS_NUM_THREADS")).result() == "1"
    assert dict(os.environ) == before


def test_random_search_on_a_local_cluster(local_search):
    plan, folder, search, ranked = local_search
    assert len(ranked) == 4 and len(search.ran) == 4
    assert all(r["status"] == "ok" and r["epochs_run"] == 2 for r in ranked)
    losses = [r["val_loss"] for r in ranked]
    assert losses == sorted(losses) and len(set(losses)) == 4
    assert all(r["val_accuracy"] > 0.3 for r in ranked)          # they learned something
    lines = (folder.path / "results.jsonl").read_text().splitlines()
    assert len(lines) == 4 and len(json.loads(lines[0])["history"]) == 2
    csv_rows = (folder.path / "results.csv").read_text().splitlines()
    assert csv_rows[0].startswith("rank,trial,round,status,seed,lr,batch,val_loss")
    assert csv_rows[1].startswith(f"1,{ranked[0]['trial']},1,ok,{ranked[0]['seed']},")


def test_coarse_to_fine_with_successive_halving(tmp_path, client):
    text = with_search("lr = loguniform(1e-3, 1); batch = choice(32, 64)\n"
                       "    method = coarse_to_fine; trials = 4; keep = 2; halving = 2",
                       "sgd(lr=0.1)")
    plan = plan_of(text, tmp_path)
    search, ranked = run_search(plan, client)
    jobs = sorted(search.ran)
    for round_ in ("1", "2"):       # 4 trials for 1 epoch, the best 2 of them for 2
        assert len([j for j in jobs if j[0].startswith(round_ + ".") and j[1] == 1]) == 4
        assert len([j for j in jobs if j[0].startswith(round_ + ".") and j[1] == 2]) == 2
    assert [r["epochs"] for r in ranked] == [2] * 4 + [1] * 4
    first = [r for r in search.final() if r["round"] == 1 and r["status"] == "ok"]
    best = [r["params"] for r in sorted(first, key=lambda r: (-r["epochs"], r["val_loss"]))[:2]]
    window = narrow(plan.config.space, plan.config.space, best)
    second = [r["params"] for r in search.final() if r["round"] == 2]
    assert all(window["lr"].low <= p["lr"] <= window["lr"].high for p in second)
    assert all(p["batch"] in window["batch"].values for p in second)


def test_a_searched_number_of_epochs_is_the_trials_own(tmp_path, client):
    plan = plan_of(with_search("epochs = choice(1, 3); method = grid"), tmp_path)
    _, ranked = run_search(plan, client)
    assert sorted((r["params"]["epochs"], r["epochs_run"]) for r in ranked) == [(1, 1), (3, 3)]


def test_a_killed_trial_is_retried_once_then_recorded(tmp_path, client, faults):
    plan = plan_of(TINY, tmp_path, trials=2)
    (faults / "1.1").write_text("")                 # its first attempt kills its worker
    seen = []
    search, ranked = run_search(plan, client, on_result=seen.append)
    assert not (faults / "1.1").exists()
    retried = [r for r in seen if r["status"] == "retrying"]
    assert [r["trial"] for r in retried] == ["1.1"] and "KilledWorker" in retried[0]["error"]
    assert {r["trial"]: (r["status"], r["attempts"]) for r in ranked} == {
        "1.0": ("ok", 1), "1.1": ("ok", 2)}
    bad = plan_of(with_search("lr = choice(1e20); trials = 1", "sgd(lr=0.1)"), tmp_path)
    _, [failed] = run_search(bad, client)                       # diverges both times
    assert failed["status"] == "failed" and failed["attempts"] == 2
    assert "the loss is" in failed["error"]


def test_an_interrupted_search_resumes_with_only_the_missing_trials(tmp_path, client):
    plan = plan_of(TINY, tmp_path)
    folder = SearchFolder(tmp_path / "out")
    folder.create({"note": "test"})

    def interrupt_after_two(record):
        if len(folder.load_results()) == 2:
            raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt):
        run_search(plan, client, folder, interrupt_after_two)
    with open(folder.path / "results.jsonl", "a") as fh:    # a line cut short by the crash
        fh.write('{"trial": "1.3", "epo')
    done = {r["trial"] for r in folder.load_results()}
    assert len(done) == 2
    search, ranked = run_search(plan, client, SearchFolder(tmp_path / "out"))
    assert sorted(t for t, _ in search.ran) == sorted({"1.0", "1.1", "1.2", "1.3"} - done)
    _, fresh = run_search(plan, client)
    assert essentials(ranked) == essentials(fresh)


def test_scheduler_and_two_workers_on_loopback_give_the_local_results(tmp_path, local_search):
    plan, _, _, local = local_search
    from graphc.search import dask_client
    bin_dir = Path(sys.executable).parent
    address_file = tmp_path / "scheduler.json"
    procs = [subprocess.Popen([str(bin_dir / "dask"), "scheduler", "--host", "127.0.0.1",
                               "--port", "0", "--dashboard-address", "127.0.0.1:0", "--scheduler-file",
                               str(address_file)], stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)]
    try:
        deadline = time.monotonic() + 30
        while not address_file.exists() and time.monotonic() < deadline:
            time.sleep(0.1)
        address = json.loads(address_file.read_text())["address"]
        # One process each: no nanny (faster to start), and so none of its single-threaded
        # BLAS settings either; the trials set that themselves.
        for _ in range(2):
            procs.append(subprocess.Popen(
                [str(bin_dir / "dask"), "worker", address, "--nthreads", "1", "--no-nanny",
                 "--no-dashboard", "--host", "127.0.0.1", "--death-timeout", "30"],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        with dask_client(address) as remote:
            remote.wait_for_workers(2, timeout=30)
            assert len(remote.scheduler_info()["workers"]) == 2
            _, distributed = run_search(plan, remote)
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in reversed(procs):
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
    assert essentials(distributed) == essentials(local)


def test_the_command_writes_results_and_a_best_nn_that_trains(tmp_path, capsys, monkeypatch):
    source = tmp_path / "s.nn"
    source.write_text(TINY)
    parser = argparse.ArgumentParser()
    add_commands(parser.add_subparsers())
    out = tmp_path / "out"
    args = parser.parse_args(["search", str(source), "--out", str(out), "--trials", "2",
                              "--workers", "1", "--quiet"])
    assert args.run(args) == 0
    table = capsys.readouterr().out
    assert "rank  trial  lr" in table and "2 trials, 2 training runs this time" in table
    best_text = (out / "best.nn").read_text()
    records = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    winner = min(records, key=lambda r: r["val_loss"])
    assert f"optimizer = adam(lr={winner['params']['lr']!r})" in best_text
    assert f"batch = {winner['params']['batch']}" in best_text
    assert "search tiny {" not in best_text
    module = parse(best_text, "best.nn")
    assert not module.searches and module.trains
    checked = check_source(best_text, "best.nn")
    assert checked.trains["tiny"].optimizer.options["lr"] == winner["params"]["lr"]
    from graphc.cli import main
    monkeypatch.chdir(tmp_path)
    assert main(["train", str(out / "best.nn"), "--epochs", "1", "--out", "run", "--quiet"]) == 0
    assert "test: loss" in capsys.readouterr().out
    resumed = parser.parse_args(["search", "--resume", str(out), "--workers", "1", "--quiet"])
    assert resumed.run(resumed) == 0
    assert "2 trials, 0 training runs this time" in capsys.readouterr().out
    with pytest.raises(GraphcError, match="--trials cannot be given with it"):
        again = parser.parse_args(["search", "--resume", str(out), "--trials", "3"])
        again.run(again)


def test_best_source_adds_settings_the_train_block_leaves_out(tmp_path):
    from graphc.frontend.search_spec import best_source
    text = with_search("clip_grad_norm = uniform(0.5, 2); weight_decay = choice(0.0, 0.01)")
    checked = checked_of(text)
    space = checked.searches["tiny"].space
    new = best_source(text, parse(text, "s.nn"), "tiny", space,
                      {"clip_grad_norm": 1.25, "weight_decay": 0.01}, "# best\n")
    settings = check_source(new, "best.nn").trains["tiny"]
    assert settings.clip_grad_norm == 1.25
    assert settings.optimizer == ("adam", {**checked.trains["tiny"].optimizer.options,
                                           "weight_decay": 0.01})
