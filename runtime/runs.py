"""A run folder: everything one training run leaves behind.

    RUN/config.json        the resolved configuration (train block after overrides, data, scaling)
    RUN/model/             the built program as an artifact, as the run began (never rewritten)
    RUN/checkpoints/       last.npz (every epoch), best.npz (the best validation score so far) and
                           final.npz (the parameters the run ends with: the best, where early
                           stopping restored them)
    RUN/trained/           the trained program as an artifact (for `graphc run`), made last
    RUN/metrics.csv        one row per epoch (also metrics.jsonl)
    RUN/scores.json        the final test (and validation) scores

Every file is replaced atomically and `model/` is written once, so an interrupted run always
leaves a folder that resumes; `trained/` is only a convenience export, rewritten by a resume.
"""
from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

from graphc.errors import error
from graphc.files import atomic_write
from graphc.runtime.artifact import load_artifact, save_artifact
from graphc.runtime.checkpoint import load_checkpoint, save_checkpoint

CONFIG, SCORES, MODEL, TRAINED = "config.json", "scores.json", "model", "trained"
METRIC_COLUMNS = ["epoch", "lr", "loss", "accuracy", "val_loss", "val_accuracy", "seconds",
                  "samples_per_s"]


class RunFolder:
    def __init__(self, path):
        self.path = Path(path)

    @property
    def last(self) -> Path:
        return self.path / "checkpoints" / "last.npz"

    @property
    def best(self) -> Path:
        return self.path / "checkpoints" / "best.npz"

    @property
    def final(self) -> Path:
        return self.path / "checkpoints" / "final.npz"

    @staticmethod
    def is_run(path) -> bool:
        return (Path(path) / CONFIG).is_file() and (Path(path) / MODEL).is_dir()

    def create(self, program, config: dict) -> None:
        (self.path / "checkpoints").mkdir(parents=True, exist_ok=True)
        self.write_json(CONFIG, config)
        save_artifact(program, self.path / MODEL)

    def config(self) -> dict:
        return self.read_json(CONFIG)

    def load_program(self, backend: str | None = "numpy"):
        return load_artifact(self.path / MODEL, backend=backend)

    def load_trained(self, backend: str | None = "numpy"):
        """The program with the run's final parameters (or, for a run that has not finished,
        those of its last checkpoint) and its input preprocessing, so that it takes raw data like
        `trained/`; returns it and the checkpoint used."""
        program = self.load_program(backend)
        for checkpoint in (self.final, self.last):
            if checkpoint.is_file():
                load_checkpoint(checkpoint, program)
                if program.preprocessing is None:
                    program.add_preprocessing(self.preprocessing())
                return program, checkpoint
        raise error(f"{self.path}: the run has no checkpoint yet",
                    hint="it stopped before its first epoch ended; train it again")

    def preprocessing(self):
        """The run's input preprocessing (graphc.ir.preprocess.Preprocessing), as recorded in its
        configuration; runs recorded before it was saved give it from their scaler, with the
        raw range unknown."""
        from graphc.ir.preprocess import Preprocessing
        data = self.config().get("data") or {}
        try:
            if data.get("preprocess"):
                return Preprocessing.from_json(data["preprocess"])
            scaler = dict(data["scaler"])
            legacy = {"input": data["features"], "raw_dtype": "float32",
                      "raw_range": [math.nan, math.nan], "scaled_range": [math.nan, math.nan]}
            return Preprocessing.from_json({**scaler, **legacy})
        except (KeyError, TypeError, ValueError) as err:
            raise error(f"{self.path / CONFIG}: malformed input-preprocessing record "
                        f"({str(err)[:120]})") from None

    def save_trained(self, program, loop_state: dict, preprocessing=None) -> None:
        """The final checkpoint, and `trained/`: the program with `preprocessing` (where it does
        not hold it yet), which takes raw data."""
        save_checkpoint(self.final, program, loop_state)
        save_artifact(program, self.path / TRAINED,
                      preprocessing=None if program.preprocessing else preprocessing)

    def write_metrics(self, history: list[dict]) -> None:
        """Rewrite both metric files from the whole history (so a resumed run never repeats or
        loses a row)."""
        text = io.StringIO()
        writer = csv.DictWriter(text, METRIC_COLUMNS, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in history:
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in METRIC_COLUMNS})
        atomic_write(self.path / "metrics.csv", text.getvalue().encode())
        lines = "".join(json.dumps(row) + "\n" for row in history)
        atomic_write(self.path / "metrics.jsonl", lines.encode())

    def write_json(self, name: str, value: dict) -> None:
        atomic_write(self.path / name, (json.dumps(value, indent=1) + "\n").encode())

    def read_json(self, name: str) -> dict:
        path = self.path / name
        try:
            value = json.loads(path.read_text())
        except FileNotFoundError:
            raise error(f"{self.path}: not a graphc run folder ({name} is missing)",
                        hint="runs are made by `graphc train FILE.nn --out DIR`") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise error(f"{path}: not valid JSON ({err})") from None
        if not isinstance(value, dict):
            raise error(f"{path}: expected a JSON object")
        return value
