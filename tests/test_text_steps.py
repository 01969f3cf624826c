"""Text data (runtime/text_data.py), training by steps (runtime/steps.py), the per-step
warmup_cosine schedule, bit-identical resume, and `graphc sample`, end to end from the command
line on a tiny text."""
from __future__ import annotations

import math
import re
from dataclasses import replace

import numpy as np
import pytest
from conftest import REPO

import graphc
from graphc.cli import main
from graphc.compiler import check_source
from graphc.errors import GraphcError
from graphc.runtime import text_data
from graphc.runtime.checkpoint import read_checkpoint
from graphc.runtime.runs import RunFolder
from graphc.runtime.schedules import make_schedule
from graphc.runtime.steps import StepTrainer
from graphc.runtime.text_data import load_text
from graphc.runtime.train import TrainSettings

TEXT = "".join(f"{name}:\nthe {word} of my heart is {word}.\n\n"
               for name, word in [("ROMEO", "rose"), ("JULIET", "love"), ("NURSE", "song")] * 40)

MODEL = """
def attend(h, d, heads) = h + (h -> layernorm -> multihead_attention(d, heads))

model lm {
    input x: i64[N, 12]
    input y: i64[N, 12]
    param E: f32[V, 16] = normal(std=0.02)
    h = embedding(x, E) + positional_embedding(12, 16)
    h = h -> attend(16, 2) -> layernorm
    output logits = h @ transpose(E)
    loss = cross_entropy(logits, y)
}

train lm {
    data = text("tiny.txt", context=12)
    optimizer = adamw(lr=3e-3)
    schedule = warmup_cosine(warmup=3, min_lr=3e-4)
    batch = 8
    steps = 30
    eval_every = 10
    eval_batches = 2
    seed = 5
}
"""


@pytest.fixture
def folder(tmp_path):
    (tmp_path / "tiny.txt").write_text(TEXT)
    vocab = len(set(TEXT))
    (tmp_path / "lm.nn").write_text(MODEL.replace("V, 16", f"{vocab}, 16"))
    return tmp_path


# --- text data -------------------------------------------------------------------------------------

def test_text_is_split_90_10_over_its_character_vocabulary(folder):
    data = load_text(folder / "tiny.txt", 12)
    assert data.vocab == "".join(sorted(set(TEXT)))
    assert len(data.splits["train"]) == int(len(TEXT) * 0.9)
    assert data.decode(np.concatenate([data.splits["train"], data.splits["val"]])) == TEXT


def test_batches_are_random_windows_with_targets_shifted_by_one(folder):
    data = load_text(folder / "tiny.txt", 12)
    x, y = data.batch("train", 5, np.random.default_rng(1))
    assert x.shape == y.shape == (5, 12) and x.dtype == np.int64
    np.testing.assert_array_equal(x[:, 1:], y[:, :-1])
    for row in x:
        assert data.decode(row) in TEXT
    again, _ = data.batch("train", 5, np.random.default_rng(1))
    np.testing.assert_array_equal(x, again)
    xs, ys = data.windows("val")
    assert xs.shape == ((len(data.splits["val"]) - 1) // 12, 12)
    np.testing.assert_array_equal(xs.ravel()[1:], ys.ravel()[:-1])


@pytest.mark.parametrize("content, message", [
    (b"ab\xffcd", r"not UTF-8 text: byte 0xFF at offset 2 \(line 1\)"),
    (b"abababababab", "the val split holds 2 characters, too few for one window"),
    (b"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa", "1 distinct character"),
])
def test_bad_text_files_are_refused_with_one_message(tmp_path, content, message):
    (tmp_path / "t.txt").write_bytes(content)
    with pytest.raises(GraphcError, match=message):
        load_text(tmp_path / "t.txt", 4)


def test_text_is_read_with_a_bound(tmp_path, monkeypatch):
    (tmp_path / "t.txt").write_text("x" * 100)
    monkeypatch.setattr(text_data, "MAX_TEXT_BYTES", 50)
    with pytest.raises(GraphcError, match="over the limit of 50 bytes"):
        load_text(tmp_path / "t.txt", 4)


# --- the train block --------------------------------------------------------------------------------

def test_warmup_cosine_is_nanogpts_schedule():
    s = make_schedule(("warmup_cosine", {"warmup": 100, "steps": 2000, "min_lr": 1e-4}), 1e-3)
    assert s.at(0) == pytest.approx(1e-3 / 101)
    assert s.at(99) == pytest.approx(1e-3 * 100 / 101)
    assert s.at(100) == pytest.approx(1e-3)
    assert s.at(1050) == pytest.approx(1e-4 + 0.5 * 0.9e-3)
    assert s.at(2000) == pytest.approx(1e-4) and s.at(5000) == 1e-4
    assert all(s.at(i) >= s.at(i + 1) for i in range(100, 2100))


@pytest.mark.parametrize("settings, message", [
    ("data = text(\"t.txt\", context=4)", "text data is trained by steps"),
    ("steps = 10", "steps trains on random windows of text data; digits is trained by epochs"),
    ("schedule = warmup_cosine(warmup=2)", "warmup_cosine is stepped per training step"),
    ("data = text(\"t.txt\", context=4)\n steps = 5\n schedule = step(every=2)",
     "schedule step is stepped per epoch"),
    ("eval_every = 10", "eval_every goes with steps"),
])
def test_step_settings_are_checked_where_written(settings, message):
    src = (f"model m {{ input x: f32[N, 4]\n output x }}\n"
           f"train m {{\n optimizer = sgd(lr=0.1)\n {settings}\n}}\n")
    with pytest.raises(GraphcError, match=message) as info:
        check_source(src, "m.nn")
    assert "m.nn:" in str(info.value)


# --- training by steps, resume, sample: from the command line --------------------------------------

def test_train_by_steps_then_sample(folder, monkeypatch, capsys):
    monkeypatch.chdir(folder)
    assert main(["train", "lm.nn", "--out", "run", "--backend", "numpy"]) == 0
    out = capsys.readouterr().out
    assert "step 10:" in out and "step 30:" in out and "val: loss" in out
    run = RunFolder(folder / "run")
    rows = [r.split(",") for r in (folder / "run" / "metrics.csv").read_text().splitlines()[1:]]
    assert [int(r[0]) for r in rows] == [10, 20, 30]
    assert float(rows[-1][4]) < float(rows[0][4]) < math.log(len(set(TEXT)))   # val loss falls
    assert run.config()["data"]["text"]["vocab"] == "".join(sorted(set(TEXT)))

    # graphc eval scores the run (and its trained/ artifact) over the whole split, as the run's
    # last line did; text has no test split
    final = re.search(r"val: loss (\d+\.\d+)", out).group(1)
    for target in ("run", "run/trained"):
        assert main(["eval", target, "--split", "val", "--backend", "numpy"]) == 0
        assert capsys.readouterr().out.startswith(f"val: loss {final} (")
    assert main(["eval", "run", "--backend", "numpy"]) == 1
    assert "no test split" in capsys.readouterr().err

    assert main(["sample", "run", "--prompt", "ROMEO:", "--tokens", "40", "--seed", "3"]) == 0
    first = capsys.readouterr().out
    assert first.startswith("ROMEO:") and len(first.rstrip("\n")) >= 40
    assert set(first) <= set(TEXT) | {"\n"}
    assert main(["sample", "run/trained", "--prompt", "ROMEO:", "--tokens", "40", "--seed", "3",
                 "--top-k", "3", "--temperature", "0.8"]) == 0
    assert capsys.readouterr().out != first
    assert main(["sample", "run", "--prompt", "ROMEO:", "--tokens", "40", "--seed", "3"]) == 0
    assert capsys.readouterr().out == first                     # seeded

    assert main(["sample", "run", "--prompt", "Zebra"]) == 1
    assert "characters not in the model's vocabulary: 'Zb'" in capsys.readouterr().err
    assert main(["sample", "run", "--top-k", "500"]) == 1
    assert "--top-k 500 is more than" in capsys.readouterr().err


def test_resume_is_bit_identical(folder, monkeypatch, capsys):
    monkeypatch.chdir(folder)
    assert main(["train", "lm.nn", "--out", "whole", "--quiet", "--backend", "numpy"]) == 0
    original = StepTrainer.end_interval

    def interrupted(self):
        original(self)
        if self.state.step == 20:
            raise KeyboardInterrupt
    monkeypatch.setattr(StepTrainer, "end_interval", interrupted)
    assert main(["train", "lm.nn", "--out", "cut", "--quiet", "--backend", "numpy"]) == 130
    assert "holds 20 steps" in capsys.readouterr().err
    monkeypatch.setattr(StepTrainer, "end_interval", original)
    config = (folder / "cut" / "config.json").read_text()
    assert main(["train", "--resume", "cut", "--epochs", "3", "--backend", "numpy"]) == 1
    assert "trains by steps (30); --epochs does not apply" in capsys.readouterr().err
    assert (folder / "cut" / "config.json").read_text() == config       # nothing recorded
    assert main(["train", "--resume", "cut", "--steps", "25", "--backend", "numpy"]) == 1
    assert "is set for 30 steps; --resume trains a run on" in capsys.readouterr().err
    assert (folder / "cut" / "config.json").read_text() == config
    assert main(["train", "--resume", "cut", "--quiet", "--backend", "numpy"]) == 0
    for name in ("metrics.csv", "scores.json"):
        whole = (folder / "whole" / name).read_text()
        cut = (folder / "cut" / name).read_text()
        if name == "metrics.csv":       # the seconds column differs
            whole, cut = ([r.split(",")[:5] for r in t.splitlines()] for t in (whole, cut))
        assert whole == cut, name
    program = RunFolder(folder / "whole").load_program()
    a, sa, _ = read_checkpoint(folder / "whole" / "checkpoints" / "final.npz", program)
    b, sb, _ = read_checkpoint(folder / "cut" / "checkpoints" / "final.npz", program)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)
    for k in sa:
        np.testing.assert_array_equal(sa[k], sb[k], err_msg=k)


def test_a_model_that_does_not_fit_the_text_is_refused(folder, monkeypatch, capsys):
    monkeypatch.chdir(folder)
    (folder / "bad.nn").write_text(MODEL.replace("V, 16", "5, 16"))
    assert main(["train", "bad.nn", "--out", "r", "--quiet", "--backend", "numpy"]) == 1
    assert "distinct characters, but the output logits is f32[N, 12, 5]" in capsys.readouterr().err
    (folder / "bad2.nn").write_text(MODEL.replace("V, 16", "40, 16").replace("context=12", "context=10"))
    assert main(["train", "bad2.nn", "--out", "r2", "--quiet", "--backend", "numpy"]) == 1
    assert "text data of context 10 feeds x windows of i64[N, 10]" in capsys.readouterr().err


SHAKESPEARE = REPO.parent / "shared" / "data" / "tinyshakespeare" / "input.txt"


def test_the_bundled_gpt_trains_on_tiny_shakespeare():
    """models/shakespeare_gpt.nn against its data (docs/training.md has the full run): the text
    fits the model, its steps make the loss fall, and the schedule is the one documented there."""
    if not SHAKESPEARE.is_file():
        pytest.skip(f"no Tiny Shakespeare at {SHAKESPEARE}")
    program = graphc.compile_file(REPO / "models" / "shakespeare_gpt.nn")
    settings = replace(TrainSettings.of(program), steps=4, eval_every=1, eval_batches=1, batch=2)
    data = load_text(SHAKESPEARE, 64)
    assert data.vocab_size == 65 and len(data.splits["val"]) == 111_540
    trainer = StepTrainer(program, settings, data)
    assert trainer.lr(0) == pytest.approx(1e-3 / 101) and trainer.lr(2000) == pytest.approx(3e-4)
    assert trainer.fit(until=1) == {}                   # stopped short of the steps: no final pass
    assert trainer.state.step == 1 and math.isfinite(trainer.state.history[0]["val_loss"])
    program.lr = 1e-3
    batch = trainer.batch(7)
    losses = [program.train_step(**batch) for _ in range(3)]
    assert losses[-1] < losses[0] < math.log(65) + 0.1, losses


@pytest.mark.parametrize("flag", ["--track-norms", "--check-numerics"])
def test_epoch_only_flags_are_refused_for_training_by_steps(folder, monkeypatch, capsys, flag):
    monkeypatch.chdir(folder)
    argv = ["train", "lm.nn", "--out", "run", "--backend", "numpy", flag]
    if flag == "--track-norms":
        argv.append("5")
    assert main(argv) == 1
    assert f"{flag} watches training by epochs" in capsys.readouterr().err
    assert not (folder / "run").exists()


def test_steps_on_the_command_line(folder, monkeypatch, capsys):
    """--steps shortens or lengthens a run (the schedule, written without steps of its own,
    follows), --resume --steps trains a finished run on; --steps and --epochs each apply to
    their own kind of training only, refused before a run folder exists."""
    monkeypatch.chdir(folder)
    assert main(["train", "lm.nn", "--out", "short", "--steps", "12", "--quiet", "--backend", "numpy"]) == 0
    rows = [r.split(",") for r in (folder / "short" / "metrics.csv").read_text().splitlines()[1:]]
    assert [int(r[0]) for r in rows] == [10, 12]
    assert float(rows[-1][1]) == pytest.approx(3e-4 + (3e-3 - 3e-4) * (1 + math.cos(math.pi * 8 / 9)) / 2)
    config = (folder / "short" / "config.json").read_text()
    assert main(["train", "--resume", "short", "--steps", "20", "--check-numerics",
                 "--backend", "numpy"]) == 1
    assert "--check-numerics watches training by epochs" in capsys.readouterr().err
    assert (folder / "short" / "config.json").read_text() == config         # nothing recorded
    assert main(["train", "--resume", "short", "--steps", "20", "--quiet", "--backend", "numpy"]) == 0
    rows = [r.split(",") for r in (folder / "short" / "metrics.csv").read_text().splitlines()[1:]]
    assert [int(r[0]) for r in rows] == [10, 12, 20]
    # trained on at the schedule's floor: the decay keeps the 12 steps the run started with
    assert float(rows[-1][1]) == pytest.approx(3e-4)
    config = RunFolder(folder / "short").config()
    assert config["settings"]["steps"] == 20 and config["horizon"] == 12
    assert config["settings"]["schedule"][1].get("steps") is None
    # its trained model, trained anew for 20 steps, decays over those 20
    assert main(["train", "short/trained", "--out", "again", "--steps", "20", "--quiet",
                 "--backend", "numpy"]) == 0
    rows = [r.split(",") for r in (folder / "again" / "metrics.csv").read_text().splitlines()[1:]]
    assert float(rows[0][1]) == pytest.approx(3e-4 + (3e-3 - 3e-4) * (1 + math.cos(math.pi * 6 / 17)) / 2)
    assert main(["train", "lm.nn", "--out", "e", "--epochs", "2", "--backend", "numpy"]) == 1
    assert "model lm trains by steps (30); --epochs does not apply" in capsys.readouterr().err
    (folder / "mlp.nn").write_text("""model m { input x: f32[N, 4]
        input y: i64[N]
        output p = x -> linear(3) -> log_softmax(axis=1)
        loss = nll(p, y) }
    train m { data = npz("d.npz") optimizer = sgd(lr=0.1) epochs = 1 }
""")
    assert main(["train", "mlp.nn", "--out", "s", "--steps", "5", "--backend", "numpy"]) == 1
    assert "model m trains by epochs; --steps applies to a model trained by steps" in \
        capsys.readouterr().err
    assert not (folder / "e").exists() and not (folder / "s").exists()
