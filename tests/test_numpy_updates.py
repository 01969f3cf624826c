"""The numpy backend's grouped, in-place optimizer updates (graphc/backends/numpy/updates.py): which
parameters share a program, that running it over flat buffers changes no number, and how the
parameters are adopted into the group's storage."""
from __future__ import annotations

import numpy as np
import pytest

import graphc
from graphc.backends.numpy import executor as numpy_backend

MODELS = ["models/digits_mlp.nn", "models/digits_adamw.nn", "models/digits_nesterov.nn",
          "models/digits_rmsprop.nn", "models/digits_adagrad.nn", "models/mnist_mlp.nn"]


def _batches(program, n=4, batch=16, seed=0):
    rng = np.random.default_rng(seed)
    (name, ttype), = program.inputs.items()
    classes = program.graphs["forward"].output_map[program.outputs[0]].shape[-1]
    for _ in range(n):
        yield {name: rng.random((batch, *ttype.shape[1:]), dtype=np.float32),
               "y": rng.integers(0, classes, batch)}


def _ungrouped(monkeypatch, path):
    with monkeypatch.context() as m:
        m.setattr(numpy_backend, "find_update_groups", lambda *args: [])
        program = graphc.compile_file(path)
    assert not program._executors["train_step"].updates
    return program


@pytest.mark.parametrize("path", MODELS)
def test_grouped_updates_change_no_number(path, monkeypatch):
    grouped, plain = graphc.compile_file(path), _ungrouped(monkeypatch, path)
    assert grouped._executors["train_step"].updates
    for batch in _batches(grouped):
        assert grouped.train_step(**batch) == plain.train_step(**batch)
    for name in plain.params:
        np.testing.assert_array_equal(grouped.params[name], plain.params[name], err_msg=name)
    for name in plain.state:
        np.testing.assert_array_equal(grouped.state[name], plain.state[name], err_msg=name)


def test_parameters_with_the_same_update_share_one_group():
    program = graphc.compile_file("models/mnist_mlp.nn")   # Adam, l2 on the weights only
    groups = program._executors["train_step"].updates
    members = sorted(sorted(g.members) for g in groups)
    names = sorted(program.params)
    assert sorted(n for m in members for n in m) == names
    roles = {n: program.param_info[n].role for n in names}
    for m in members:                    # weight decay splits weights from biases, nothing else
        assert len({roles[n] for n in m}) == 1
    assert len(members) == len(set(roles.values()))


def test_updates_are_written_in_place_from_the_second_step():
    program = graphc.compile_file("models/digits_mlp.nn")
    batches = list(_batches(program, n=3))
    program.train_step(**batches[0])
    stored = {k: program.params[k] for k in program.params}
    lanes = [lane for g in program._executors["train_step"].updates for lane in g.lanes]
    for name, array in stored.items():
        assert any(np.shares_memory(array, lane) for lane in lanes), name
    before = {k: v.copy() for k, v in stored.items()}
    program.train_step(**batches[1])
    for name, array in stored.items():
        assert program.params[name] is array                      # the same storage ...
        assert not np.array_equal(array, before[name]), name      # ... updated in place


def test_updates_are_returned_unless_the_arrays_passed_in_hold_them():
    """Like the compiled backends, a run given the storage the updates write in place (the last
    run's `new X`) returns no `new X`; one given any other array returns them all."""
    program = graphc.compile_file("models/digits_mlp.nn")
    ex = program._executors["train_step"]
    batch = next(_batches(program, n=1))
    feeds = {**batch, "#lr": program._lr_array(), "#rng": np.int64(7)}
    params, state = dict(program.params), dict(program.state)
    updated = {name for name, _ in ex.graph.outputs if name.startswith("new ")
               and name != "new #step"}
    first = ex.run(feeds, params, {"N": 16}, state)
    assert updated <= set(first)
    for name in updated:
        target = name.removeprefix("new ")
        (state if target in state else params)[target] = first[name]
    state["#step"] = first["new #step"]
    second = ex.run(feeds, params, {"N": 16}, state)
    assert not updated & set(second) and {"loss", "new #step"} <= set(second)
    name = next(iter(params))
    params[name] = params[name].copy()              # one other array: everything comes back
    assert updated <= set(ex.run(feeds, params, {"N": 16}, state))


def test_a_parameter_replaced_between_steps_is_used(monkeypatch):
    grouped = graphc.compile_file("models/digits_mlp.nn")
    plain = _ungrouped(monkeypatch, "models/digits_mlp.nn")
    batches = list(_batches(grouped, n=3))
    for program in (grouped, plain):
        program.train_step(**batches[0])
        name = next(iter(program.params))
        program.params[name] = np.full_like(program.params[name], 0.25)
        program.train_step(**batches[1])
    for name in plain.params:
        np.testing.assert_array_equal(grouped.params[name], plain.params[name], err_msg=name)


def test_a_scalar_parameter_is_left_to_the_plain_steps():
    source = """
model s {
    input x: f32[N, 3]
    input t: f32[N, 1]
    param W: f32[3, 1] = normal()
    param k: f32[] = constant(2.0)
    output f = (x @ W) * k
    loss = mse(f, t)
}
train s { optimizer = adam(lr=0.01) }
"""
    program = graphc.compile_source(source)
    groups = program._executors["train_step"].updates
    assert [g.members for g in groups] == [["W"]]
    rng = np.random.default_rng(1)
    for _ in range(3):
        program.train_step(x=rng.random((5, 3), dtype=np.float32), t=rng.random((5, 1), dtype=np.float32))
    assert program.params["k"].shape == () and program.params["k"] != 2.0
