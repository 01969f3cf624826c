"""The compiler-runtime contract (graphc/ir/contract.py): the train step's updates and feeds as
data, checked against what the step computes; the one place names are made; artifacts that carry
the contract and those written before it was recorded; and the compiler's layering (it imports
the core only)."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pytest
from backend_cases import train_batch

import graphc
from graphc.ir.contract import LR_INPUT, RNG_INPUT, STEP_STATE, TrainStep, UpdateKind

REPO = Path(__file__).resolve().parent.parent
BN_MODEL = """
model bn { input x: f32[N, 4]  input y: i64[N]
  h = relu(batchnorm(linear(x, 6)))
  output logits = linear(h, 3)
  loss = cross_entropy(logits, y) }
train bn { optimizer = adam(lr=1e-2); seed = 1 }
"""


def test_the_contract_says_what_each_output_updates():
    program = graphc.compile_source(BN_MODEL)
    contract = program.train_step_contract
    outputs = program.graphs["train_step"].output_map
    assert contract.loss == "loss" and contract.loss in outputs
    kinds = {u.target: u.kind for u in contract.updates}
    assert kinds[STEP_STATE] is UpdateKind.STEP
    for name, info in program.param_info.items():
        assert kinds[name] is (UpdateKind.STAT if info.role == "stat" else UpdateKind.PARAM), name
    assert {u.target for u in contract.updates if u.kind is UpdateKind.SLOT} == \
        set(program.state_info) - {STEP_STATE}
    for u in contract.updates:
        assert u.output in outputs and outputs[u.output].type == (
            program.state_info if u.in_state else program.param_info)[u.target].type
        if u.kind is UpdateKind.SLOT:
            assert u.param in program.param_info and u.slot in ("exp_avg", "exp_avg_sq")
    assert [u.output for u in contract.updates] == [n for n, _ in program.graphs["train_step"].outputs
                                                    if n != "loss"]
    assert (contract.feeds.lr, contract.feeds.rng, contract.feeds.step) == (LR_INPUT, None, STEP_STATE)


def test_the_feeds_name_the_random_key_where_the_step_draws_one():
    program = graphc.compile_file(REPO / "models/mnist_cnn.nn")
    assert program.train_step_contract.feeds.rng == RNG_INPUT


def test_the_contract_survives_json():
    contract = graphc.compile_source(BN_MODEL).train_step_contract
    assert TrainStep.from_json(json.loads(json.dumps(contract.to_json()))) == contract


@pytest.mark.parametrize("backend", ["numpy", "llvm"])
def test_an_artifact_from_before_the_contract_loads_with_the_same_contract(tmp_path, backend):
    """Artifacts written before the manifest held `train_step` (graphc 0.1.0) get their contract
    from the output names, and train exactly as a fresh build does."""
    import hashlib
    program = graphc.compile_source(BN_MODEL)
    program.save(tmp_path / "new")
    program.save(tmp_path / "old")
    manifest = json.loads((tmp_path / "old/manifest.json").read_text())
    del manifest["train_step"]
    (tmp_path / "old/manifest.json").write_text(json.dumps(manifest))
    new = graphc.load_artifact(tmp_path / "new", backend=backend)
    old = graphc.load_artifact(tmp_path / "old", backend=backend)
    assert old.train_step_contract == new.train_step_contract == program.train_step_contract
    batch = train_batch(new, 8, np.random.default_rng(0))
    for _ in range(3):
        assert old.train_step(**batch) == new.train_step(**batch)
    digest = [hashlib.sha256(b"".join(np.ascontiguousarray(p.params[k]).tobytes()
                                      for k in sorted(p.params))).hexdigest() for p in (old, new)]
    assert digest[0] == digest[1]


def test_an_artifact_whose_contract_names_nothing_is_refused(tmp_path):
    graphc.compile_source(BN_MODEL).save(tmp_path / "a")
    manifest = json.loads((tmp_path / "a/manifest.json").read_text())
    manifest["train_step"]["updates"][1]["target"] = "nowhere"
    (tmp_path / "a/manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(graphc.GraphcError, match="malformed artifact: train-step update"):
        graphc.load_artifact(tmp_path / "a")


def _python_files(*folders: str) -> list[Path]:
    return [p for f in folders for p in sorted((REPO / f).rglob("*.py"))]


def test_output_and_state_names_are_made_in_the_contract_only():
    """No module but graphc/ir/contract.py spells the names of the train step's outputs, the fed
    inputs or the state slots, nor cuts them apart."""
    pattern = re.compile(r'''["'](new |grad |stat |#lr|#rng|#step)|\[4:\]|removeprefix\(["']new''')
    offenders = [f"{p.relative_to(REPO)}:{i}" for p in _python_files("graphc", "runtime")
                 if p.name != "contract.py"
                 for i, line in enumerate(p.read_text().splitlines(), 1) if pattern.search(line)]
    assert not offenders


def test_train_settings_are_typed_and_read_back_from_their_json():
    from dataclasses import replace

    from graphc.compiler import check_source
    from graphc.train_config import OptimizerSpec, TrainConfig
    config = check_source(BN_MODEL.replace("seed = 1", "seed = 1; augment = [noise(0.1)]; "
                                           "early_stop = early_stop(3)")).trains["bn"]
    assert isinstance(config.optimizer, OptimizerSpec) and config.optimizer.name == "adam"
    assert config.lr == 1e-2 and config.augment[0].name == "noise"
    assert config.written == ("optimizer", "seed", "augment", "early_stop")
    back = TrainConfig.from_json("bn", json.loads(json.dumps(config.to_json())))
    assert back == replace(config, written=())
    program = graphc.compile_source(BN_MODEL)
    assert TrainConfig.from_json("bn", program.meta["train"]).optimizer == ("adam", {
        "lr": 1e-2, "beta1": 0.9, "beta2": 0.999, "eps": 1e-8, "weight_decay": 0.0,
        "amsgrad": False})
