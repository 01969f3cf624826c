"""A search's output folder and its ranking.

    DIR/search.json     what was searched: the .nn source itself, the model, the search settings
                        after command-line overrides, the data folders (for --resume)
    DIR/results.jsonl   one line per finished job (a trial trained to a number of epochs), with
                        its values, seed, metrics and per-epoch history; appended and synced as
                        each job finishes, so an interrupted search loses nothing
    DIR/results.csv     one row per trial, its last job, best first (rewritten atomically)
    DIR/best.nn         the source with the best trial's values in its train block
"""
from __future__ import annotations

import csv
import io
import json
import os
from pathlib import Path

from graphc.errors import error
from graphc.files import atomic_write, load_json, read_jsonl
from graphc.frontend.search_spec import SearchConfig

FORMAT, VERSION = "graphc-search", 1
SEARCH, RESULTS, TABLE, BEST = "search.json", "results.jsonl", "results.csv", "best.nn"
METRIC_COLUMNS = ["val_loss", "val_accuracy", "test_loss", "test_accuracy", "loss"]


def rank(records: list[dict], config: SearchConfig) -> list[dict]:
    """Best first: finished trials by the metric (those trained longest first, since successive
    halving's early scores are not comparable with full runs), then failed ones, in trial order."""
    def key(r: dict):
        value = r.get(config.metric)
        failed = r["status"] != "ok" or value is None
        score = 0.0 if failed else (-value if config.maximize else value)
        return (failed, -r["epochs"], score, r["round"], r["index"])
    return sorted(records, key=key)


class SearchFolder:
    def __init__(self, path):
        self.path = Path(path)

    @staticmethod
    def is_search(path) -> bool:
        return (Path(path) / SEARCH).is_file()

    def create(self, meta: dict) -> None:
        if self.is_search(self.path):
            raise error(f"{self.path}: already holds a search",
                        hint=f"continue it with --resume {self.path}, or choose another --out")
        self.path.mkdir(parents=True, exist_ok=True)
        atomic_write(self.path / SEARCH, (json.dumps({"format": FORMAT, "version": VERSION,
                                                      **meta}, indent=1) + "\n").encode())
        atomic_write(self.path / RESULTS, b"")

    def meta(self) -> dict:
        path = self.path / SEARCH
        if not path.exists() and not path.is_symlink():
            raise error(f"{self.path}: not a graphc search folder ({SEARCH} is missing)",
                        hint="searches are made by `graphc search FILE.nn --out DIR`")
        meta = load_json(path)      # bounded: a regular file, size and nesting
        if not isinstance(meta, dict) or meta.get("format") != FORMAT:
            raise error(f"{path}: not a graphc search record")
        if meta.get("version") != VERSION:
            raise error(f"{path}: search record version {meta.get('version')}, this graphc "
                        f"reads version {VERSION}")
        return meta

    def load_results(self) -> list[dict]:
        """The finished jobs; a last line cut short by a crash is dropped (its job runs again)."""
        return [r for r in read_jsonl(self.path / RESULTS) if {"trial", "epochs", "status"} <= set(r)]

    def append(self, record: dict, final: list[dict], config: SearchConfig) -> None:
        """Add a finished job: one synced line, then the per-trial table rewritten."""
        with open(self.path / RESULTS, "a") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())
        atomic_write(self.path / TABLE, results_csv(rank(final, config), config).encode())

    def write_best(self, text: str) -> Path:
        atomic_write(self.path / BEST, text.encode())
        return self.path / BEST


def results_csv(records: list[dict], config: SearchConfig) -> str:
    columns = (["rank", "trial", "round", "status", "seed", *config.space, *METRIC_COLUMNS,
                "epochs", "best_epoch", "attempts", "seconds", "error"])
    text = io.StringIO()
    writer = csv.DictWriter(text, columns, lineterminator="\n")
    writer.writeheader()
    for i, r in enumerate(records, 1):
        row = {"rank": i, **{k: r.get(k) for k in columns[1:]}, **r["params"],
               "error": (r.get("error") or "").splitlines()[0] if r.get("error") else None}
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return text.getvalue()


def format_table(records: list[dict], config: SearchConfig, full_epochs: int) -> str:
    """The ranked trials as a text table: values, the metric, validation accuracy, epochs."""
    header = ["rank", "trial", *config.space, config.metric]
    if config.metric != "val_accuracy":
        header.append("val_accuracy")
    header += ["epochs", "seconds", "status"]
    rows = [header]
    for i, r in enumerate(records, 1):
        row = [str(i), r["trial"], *(_cell(r["params"][k]) for k in config.space)]
        row += [_cell(r.get(k)) for k in header[len(row):-3]]
        status = r["status"] if r["status"] != "ok" else (
            "ok" if r["epochs"] >= full_epochs else "stopped (halving)")
        if r["status"] == "failed":
            status = "failed: " + (r.get("error") or "").splitlines()[0][:60]
        row += [str(r.get("epochs_run", r["epochs"])), _cell(r.get("seconds")), status]
        rows.append(row)
    widths = [max(len(row[c]) for row in rows) for c in range(len(header))]
    lines = []
    for n, row in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
        if n == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _cell(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)
