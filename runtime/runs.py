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
import re
from pathlib import Path

from graphc.errors import error
from graphc.files import ListOf, MapOf, atomic_write, check_schema, load_json
from graphc.runtime.artifact import save_artifact
from graphc.runtime.checkpoint import load_checkpoint, save_checkpoint
from graphc.runtime.program import load_artifact
from graphc.runtime.train import METRIC_COLUMNS

CONFIG, SCORES, MODEL, TRAINED = "config.json", "scores.json", "model", "trained"
_NONE = type(None)
CONFIG_SCHEMA = {
    "model": str, "source?": (str, _NONE), "graphc_version?": str,
    "settings": {"data": list, "optimizer": list, "schedule": list, "early_stop": (list, _NONE),
                 "batch": int, "epochs": int, "seed": int, "validation": float, "test": float,
                 "scale": str, "augment?": ListOf(list), "device?": str, "backend?": str,
                 "clip_grad_value?": (float, _NONE), "clip_grad_norm?": (float, _NONE),
                 "steps?": (int, _NONE), "eval_every?": (int, _NONE), "eval_batches?": int},
    "data": {"source": str, "sizes": MapOf(int), "scaler": dict, "features": str, "labels": str,
             "classes": (ListOf(str), _NONE), "preprocess?": dict},
    "base_dir": str, "data_dir?": (str, _NONE), "track_norms?": (int, _NONE),
    "ranks?": int,          # data-parallel ranks (runtime.distributed); absent: one process
}
# a run trained by steps on text (runtime/steps.py) records its text data instead
# ... and, once `--resume --steps` changed its steps, the steps a schedule that follows them
# keeps decaying over (graphc/train_cli.py)
TEXT_CONFIG_SCHEMA = {**CONFIG_SCHEMA, "data": {"text": {"source": str, "vocab": str, "context": int,
                                                         "sizes": MapOf(int)}},
                      "horizon?": int}
# what atomic_write leaves behind when killed: "." + the file's name + "." + 8 random characters
_TEMPORARY = re.compile(r"\.(config\.json|scores\.json|metrics\.csv|metrics\.jsonl|last\.npz|"
                        r"best\.npz|final\.npz)\.[A-Za-z0-9_]{8}")


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
        """Write the model, then config.json: a folder is a run once its config is there, so one
        killed before that is not a run and can be started again."""
        (self.path / "checkpoints").mkdir(parents=True, exist_ok=True)
        save_artifact(program, self.path / MODEL)
        self.write_json(CONFIG, config)

    def config(self) -> dict:
        config = self.read_json(CONFIG)
        text = isinstance(config, dict) and isinstance(config.get("data"), dict) and "text" in config["data"]
        check_schema(config, TEXT_CONFIG_SCHEMA if text else CONFIG_SCHEMA, self.path / CONFIG)
        if (config.get("track_norms") or 1) < 1:
            raise error("track_norms must be at least 1", file=self.path / CONFIG)
        return config

    def check_confined(self) -> None:
        """Refuse a run folder whose subfolders are symbolic links: continuing it would write
        checkpoints and exports wherever they point."""
        for name in ("checkpoints", MODEL, TRAINED):
            if (self.path / name).is_symlink():
                raise error(f"{name}/ is a symbolic link; a run writes only inside its own folder",
                            file=self.path / name)

    def remove_temporaries(self) -> None:
        """Remove the temporary files (`.last.npz.XXXXXXXX`) a run killed mid-write leaves."""
        for folder in (self.path, self.path / "checkpoints"):
            if folder.is_dir():
                for tmp in folder.iterdir():
                    if _TEMPORARY.fullmatch(tmp.name) and not tmp.is_dir():
                        tmp.unlink(missing_ok=True)

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
                if program.preprocessing is None and "text" not in (self.config().get("data") or {}):
                    program.add_preprocessing(self.preprocessing())   # (text feeds token ids)
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

    def write_rows(self, name: str, rows: list[dict], columns: list[str]) -> None:
        """NAME.csv (those columns) and NAME.jsonl from all the rows (training by steps)."""
        text = io.StringIO()
        writer = csv.DictWriter(text, columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in columns})
        atomic_write(self.path / f"{name}.csv", text.getvalue().encode())
        atomic_write(self.path / f"{name}.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode())

    def write_json(self, name: str, value: dict) -> None:
        atomic_write(self.path / name, (json.dumps(value, indent=1) + "\n").encode())

    def read_json(self, name: str) -> dict:
        path = self.path / name
        if not path.exists() and not path.is_symlink():
            raise error(f"{self.path}: not a graphc run folder ({name} is missing)",
                        hint="runs are made by `graphc train FILE.nn --out DIR`")
        value = load_json(path)
        if not isinstance(value, dict):
            raise error(f"{path}: expected a JSON object")
        return value


def load_run(path, backend: str | None = None):
    """The trained program of run folder `path` (`graphc train`'s output): its final parameters
    and its input preprocessing, on `backend` (None: the one its train block asks for), with the
    run's settings after the command line's overrides."""
    run = RunFolder(path)
    if not RunFolder.is_run(run.path):
        raise error(f"{run.path}: not a graphc run folder (no config.json and model/)",
                    hint="runs are made by `graphc train FILE.nn`; an artifact folder loads with "
                         "graphc.load_artifact")
    program, _ = run.load_trained(backend)
    program.meta["train"] = run.config()["settings"]
    return program
