"""`graphc report`: PNG plots (matplotlib, Agg) and a small static HTML page for a run folder
(loss, accuracy, learning rate, weight and gradient norms) or a search folder (the metric against
each hyperparameter)."""
from __future__ import annotations

import html
import json
import math
from dataclasses import dataclass, field
from pathlib import Path

from graphc.errors import error
from graphc.files import read_jsonl

REPORT_DIR = "report"
RESULTS, SEARCH = "results.jsonl", "search.json"
DPI = 110
# Top-level numbers of a search result row that describe the job, not how well it did.
JOB_KEYS = {"trial", "round", "index", "seed", "epochs", "epochs_run", "best_epoch", "attempts",
            "seconds", "stopped_early"}


@dataclass
class Report:
    folder: Path
    title: str
    facts: list[tuple[str, str]] = field(default_factory=list)   # the page's summary table
    figures: list[tuple[str, str]] = field(default_factory=list)  # (PNG file name, caption)
    warnings: list[str] = field(default_factory=list)
    table: tuple[list[str], list[list[str]]] | None = None       # header, rows

    @property
    def page(self) -> Path:
        return self.folder / "index.html"


def make_report(target, out=None) -> Report:
    """Write the report of a run or search folder into `out` (default TARGET/report)."""
    from graphc.runtime.runs import RunFolder
    target = Path(target)
    folder = Path(out) if out else target / REPORT_DIR
    if RunFolder.is_run(target):
        build = _run_report
    elif (target / RESULTS).is_file() or (target / SEARCH).is_file():
        build = _search_report
    else:
        what = "no such folder" if not target.is_dir() else "neither a run folder (config.json " \
            "and model/) nor a search folder (results.jsonl)"
        raise error(f"{target}: {what}",
                    hint="runs come from `graphc train ... --out DIR`, searches from "
                         "`graphc search ... --out DIR`")
    if folder.exists() and not folder.is_dir():
        raise error(f"{folder}: exists and is not a folder")
    _pyplot_free_matplotlib()
    folder.mkdir(parents=True, exist_ok=True)
    report = build(target, folder)
    report.page.write_text(_html(report))
    return report


def _pyplot_free_matplotlib() -> None:
    try:
        import matplotlib  # noqa: F401  (figures are drawn with Figure, never pyplot: no GUI)
    except ImportError:
        raise error("graphc report draws with matplotlib, which is not installed",
                    hint="pip install -e '.[report]' (from graphc's clone)") from None


# --- a run -------------------------------------------------------------------------------------

def _run_report(target: Path, folder: Path) -> Report:
    from graphc.runtime.norms import NORMS, gradient_warnings, read_norms
    from graphc.runtime.runs import RunFolder
    run = RunFolder(target)
    config = run.config()
    rows = read_jsonl(target / "metrics.jsonl")
    if not rows:
        raise error(f"{target}: the run has no finished epoch to plot yet")
    settings = config.get("settings", {})
    report = Report(folder, f"run {target.name}: {config.get('model', '?')}")
    scores = _json_or_none(target / "scores.json")
    report.facts = _run_facts(config, settings, scores, len(rows))
    report.figures.append(("curves.png", _plot_curves(rows, folder / "curves.png", scores)))
    norms = read_norms(target / NORMS)
    report.figures.append(("lr.png", _plot_lr(rows, norms, folder / "lr.png")))
    if norms:
        params = _param_roles(target)
        weights = [p for p, role in params.items() if role == "weight"] or list(params)
        found = gradient_warnings(norms, weights)
        report.warnings = [_warning_text(w) for w in found]
        report.figures.append(("norms.png", _plot_norms(norms, params, found,
                                                        folder / "norms.png")))
    else:
        report.facts.append(("weight and gradient norms",
                             "not recorded (train with --track-norms to record them)"))
    header = [k for k in ("epoch", "loss", "val_loss", "accuracy", "train_accuracy",
                          "val_accuracy", "lr", "seconds") if any(k in r for r in rows)]
    report.table = (header, [[_metric_cell(k, r.get(k)) for k in header] for r in rows])
    return report


def _run_facts(config: dict, settings: dict, scores: dict | None, epochs: int) -> list:
    facts = [("model", f"{config.get('model')} ({config.get('source') or 'artifact'})")]
    for key in ("optimizer", "schedule"):
        if settings.get(key):
            name, opts = settings[key]
            inner = ", ".join(f"{k}={v}" for k, v in opts.items() if v not in (None, False))
            facts.append((key, f"{name}({inner})"))
    facts.append(("batch, seed", f"{settings.get('batch')}, {settings.get('seed')}"))
    facts.append(("epochs", f"{epochs} of {settings.get('epochs')}"))
    for split in ("val", "test"):
        if scores and split in scores:
            s = scores[split]
            text = f"loss {s['loss']:.4f}"
            if s.get("accuracy") is not None:
                text += f", accuracy {100 * s['accuracy']:.2f}%"
            facts.append((f"{split} score", text))
    return facts


def _param_roles(target: Path) -> dict[str, str]:
    """Parameter -> role, in declaration order (layer order), from the run's artifact."""
    manifest = _json_or_none(target / "model" / "manifest.json") or {}
    return {p["name"]: p.get("role") or "other" for p in manifest.get("params", [])}


def _plot_curves(rows: list[dict], path: Path, scores: dict | None = None) -> str:
    """Loss and accuracy per epoch, with a marker at the epoch whose parameters were kept (the
    lowest validation loss, or the early-stopping rule's best) and where early stopping ended."""
    epochs = [r["epoch"] for r in rows]
    scores = scores or {}
    best_epoch = scores.get("best_epoch") or min(
        rows, key=lambda r: r.get("val_loss", math.inf))["epoch"]
    stopped = scores.get("epochs") if scores.get("stopped_early") else None
    accuracy = [k for k in ("accuracy", "train_accuracy", "val_accuracy")
                if any(r.get(k) is not None for r in rows)]
    fig, axes = _figure(1, 2 if accuracy else 1, height=3.8)
    ax = axes[0]
    for key, label in (("loss", "training"), ("val_loss", "validation")):
        _line(ax, epochs, [r.get(key) for r in rows], label, marker="o")
    ax.set(title="loss per epoch", xlabel="epoch", ylabel="loss")
    if _spans(_values(rows, "loss") + _values(rows, "val_loss"), 30):
        ax.set_yscale("log")
    ax.legend()
    if accuracy:
        ax = axes[1]
        for key in accuracy:
            label = "validation" if key == "val_accuracy" else "training"
            _line(ax, epochs, [None if r.get(key) is None else 100 * r[key] for r in rows], label,
                  marker="o")
        ax.set(title="accuracy per epoch", xlabel="epoch", ylabel="accuracy (%)")
        ax.legend()
    for ax in axes:
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.axvline(best_epoch, color="C2", linestyle="--", linewidth=1, label="best epoch")
        if stopped is not None:
            ax.axvline(stopped, color="C3", linestyle=":", linewidth=1, label="early stop")
        ax.legend()
    _save(fig, path)
    best = next((r for r in rows if r["epoch"] == best_epoch), rows[-1])
    return (f"Training loss (mean over the epoch's batches, dropout on) and validation loss and "
            f"accuracy after each epoch. The dashed line marks the best epoch, {best_epoch} "
            f"(validation loss {best.get('val_loss', 0):.4f}), whose parameters the run kept"
            + (f"; the dotted one where early stopping ended it, after epoch {stopped}"
               if stopped is not None else "") + ".")


def _plot_lr(rows: list[dict], norms: list[dict], path: Path) -> str:
    fig, axes = _figure(1, 1, height=3.0, width=7.0)
    ax = axes[0]
    if norms:        # the step-level record is finer than one value per epoch
        ax.plot([r["step"] for r in norms], [r["lr"] for r in norms], color="C0",
                drawstyle="steps-post")
        ax.set_xlabel("training step")
        _epoch_marks(ax, norms)
    else:
        ax.step([r["epoch"] for r in rows], [r["lr"] for r in rows], where="mid", marker="o",
                color="C0")
        ax.set_xlabel("epoch")
        ax.xaxis.get_major_locator().set_params(integer=True)
    lrs = [r["lr"] for r in (norms or rows)]
    if _spans(lrs, 20):
        ax.set_yscale("log")
    ax.set(title="learning rate", ylabel="learning rate")
    _save(fig, path)
    return (f"The learning rate the schedule set, from {lrs[0]:.3g} to {lrs[-1]:.3g}"
            + (" (recorded every few steps with the norms)." if norms else " (per epoch)."))


def _plot_norms(norms: list[dict], params: dict[str, str], found: list[dict], path: Path) -> str:
    from graphc.runtime.norms import EXPLODING, VANISHING
    names = [p for p in params if p in norms[0]["weights"]] or list(norms[0]["weights"])
    steps = [r["step"] for r in norms]
    fig, axes = _figure(1, 2, height=4.2, width=13.0)
    for ax, key, title in ((axes[0], "weights", "weight L2 norm"),
                           (axes[1], "grads", "gradient L2 norm (log scale)")):
        for i, name in enumerate(names):
            style = "-" if params.get(name, "weight") == "weight" else "--"
            ys = [r[key].get(name) for r in norms]
            if key == "grads":
                ys = [_positive(y) for y in ys]          # a log axis cannot show 0
            ax.plot(steps, ys, style, color=f"C{i % 10}", label=name, linewidth=1.4)
        ax.set(title=title, xlabel="training step")
        _epoch_marks(ax, norms)
    axes[1].set_yscale("log")
    values = [g for r in norms for g in r["grads"].values() if g is not None and g > 0]
    for limit, what in ((VANISHING, "vanishing"), (EXPLODING, "exploding")):
        if values and (min(values) < 10 * limit if what == "vanishing" else max(values) > limit / 10):
            axes[1].axhline(limit, color="red", linestyle=":", linewidth=1.2)
            axes[1].annotate(f"{what} ({limit:g})", (steps[0], limit), color="red", fontsize=8,
                             va="bottom")
    for w in found:
        axes[1].axvline(w["step"], color="red", alpha=0.5, linewidth=1)
    axes[1].legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False)
    _save(fig, path)
    verdict = (f"{len(found)} warning{'s' if len(found) != 1 else ''} (red lines mark where each "
               f"starts)" if found else "no sign of vanishing or exploding gradients")
    return (f"L2 norm of every parameter (weights solid, biases dashed) and of its gradient on the "
            f"batch about to be trained on, every {steps[1] - steps[0] if len(steps) > 1 else 1} "
            f"steps: {verdict}.")


def _epoch_marks(ax, norms: list[dict]) -> None:
    """A faint line and label where each epoch starts, on a plot over training steps."""
    starts: dict = {}
    for r in norms:
        starts.setdefault(r.get("epoch"), r.get("epoch_start", r["step"]))
    if len(starts) < 2 or len(starts) > 40:
        return
    for epoch, step in starts.items():
        ax.axvline(step, color="#999999", linewidth=0.8, alpha=0.6)
        ax.annotate(f"epoch {epoch}", (step, 0), xycoords=("data", "axes fraction"),
                    xytext=(2, 3), textcoords="offset points", fontsize=7, color="#666666")


def _warning_text(w: dict) -> str:
    where = f"step {w['step']}" + (f" (epoch {w['epoch']})" if w.get("epoch") else "")
    more = f" (and in {w['steps'] - 1} later records)" if w["steps"] > 1 else ""
    return f"{where}: {w['text']}{more}"


# --- a search ----------------------------------------------------------------------------------

def _search_report(target: Path, folder: Path) -> Report:
    meta = _json_or_none(target / SEARCH) or {}
    config = meta.get("config") if isinstance(meta.get("config"), dict) else meta
    trials = _final_trials(read_jsonl(target / RESULTS))
    done = [t for t in trials if t["metrics"]]
    if not done:
        raise error(f"{target}: the search has no finished trial to plot yet")
    metrics = list(dict.fromkeys(k for t in done for k in t["metrics"]))
    metric = config.get("metric") if config.get("metric") in metrics else (
        "val_loss" if "val_loss" in metrics else metrics[0])
    log_params = _log_uniform(config) | {p for t in trials for p in t["log"]}
    params = list(dict.fromkeys(k for t in done for k in t["params"]))
    report = Report(folder, f"search {target.name}" + (f": {meta['model']}" if meta.get("model")
                                                          else ""))
    failed = len(trials) - len(done)
    report.facts = [("trials", f"{len(done)} finished" + (f", {failed} failed" if failed else "")),
                    ("metric", metric + (" (higher is better)" if _higher(metric) else
                                         " (lower is better)"))]
    space = config.get("space") or {}
    for p in params:
        spec = space.get(p)
        report.facts.append((p, _describe_dim(spec) if isinstance(spec, dict) else "searched"))
    shown = [metric] + [m for m in metrics if m != metric and "accuracy" in m and m.startswith("val")]
    for m in shown[:2]:
        name = f"search_{_safe(m)}.png"
        report.figures.append((name, _plot_search(done, params, m, metric, log_params,
                                                  folder / name)))
    ranked = sorted(done, key=lambda t: -t["metrics"][metric] if _higher(metric)
                    else t["metrics"][metric]) if all(metric in t["metrics"] for t in done) else done
    header = ["rank", "trial", *params, *metrics]
    report.table = (header, [[str(i), str(t["id"]), *(_cell(t["params"].get(p)) for p in params),
                              *(_metric_cell(m, t["metrics"].get(m)) for m in metrics)]
                             for i, t in enumerate(ranked, 1)])
    return report


def _final_trials(rows: list[dict]) -> list[dict]:
    """One entry per trial: its values, its metrics and the params it marks as log-uniform, from
    its last row (a trial trained further by successive halving has several)."""
    last: dict = {}
    for i, row in enumerate(rows):
        trial = row.get("trial", i)
        if trial not in last or row.get("epochs", 0) >= last[trial].get("epochs", 0):
            last[trial] = row
    out = []
    for trial, row in last.items():
        params = row.get("params") or row.get("config") or row.get("values")
        if not isinstance(params, dict):      # a flat row: what is not a metric or a job field
            params = {k: v for k, v in row.items() if k not in JOB_KEYS and not _is_metric(k)
                      and isinstance(v, (int, float, str)) and not isinstance(v, bool)
                      and k not in ("status", "error")}
        failed = row.get("status") not in (None, "ok")
        metrics = {} if failed else {k: float(v) for k, v in _flatten(row).items()
                                     if _is_metric(k) and _number(v)}
        out.append({"id": trial, "round": row.get("round", 0), "params": params,
                    "metrics": metrics, "log": _log_uniform(row)})
    return out


def _flatten(row: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in row.items():
        if k in ("params", "config", "values", "history"):
            continue
        if isinstance(v, dict):
            out.update(_flatten(v, f"{prefix}{k}_"))
        else:
            out[prefix + k] = v
    return out


def _is_metric(key: str) -> bool:
    return any(word in key for word in ("loss", "accuracy", "error_rate", "score"))


def _higher(metric: str) -> bool:
    return "accuracy" in metric or "score" in metric


def _log_uniform(record: dict) -> set[str]:
    """Parameters a search record says were sampled log-uniformly: a `space` (or `log`) entry."""
    space = record.get("space") or record.get("distributions") or {}
    marked = {k for k, spec in space.items() if "loguniform" in str(spec).lower()} \
        if isinstance(space, dict) else set()
    if isinstance(record.get("log"), list):
        marked |= {str(k) for k in record["log"]}
    return marked


def _describe_dim(spec: dict) -> str:
    if spec.get("kind") == "choice":
        return f"choice({', '.join(str(v) for v in spec.get('values', []))})"
    return f"{spec.get('kind')}({spec.get('low'):g}, {spec.get('high'):g})" \
        if _number(spec.get("low")) and _number(spec.get("high")) else str(spec.get("kind"))


def _plot_search(trials: list[dict], params: list[str], metric: str, ranked_by: str,
                 log_params: set[str], path: Path) -> str:
    """`metric` of each trial against each searched value; the star is the search's best trial,
    by `ranked_by` (the search's metric, as best.nn and the table pick it), whichever metric is
    plotted. Accuracies are percentages, as everywhere in the report."""
    cols = min(3, len(params)) or 1
    rows = math.ceil(len(params) / cols) or 1
    fig, axes = _figure(rows, cols, height=3.4 * rows, width=4.6 * cols)
    scale = 100.0 if "accuracy" in metric else 1.0
    scored = [t for t in trials if metric in t["metrics"]]
    ranked = [t for t in scored if ranked_by in t["metrics"]] or scored
    best = (max if _higher(ranked_by) else min)(
        ranked, key=lambda t: t["metrics"].get(ranked_by, t["metrics"][metric]))
    rounds = sorted({t["round"] for t in scored})
    logged = []
    for ax, p in zip(axes, params):
        points = [(t["params"].get(p), scale * t["metrics"][metric], t) for t in scored
                  if t["params"].get(p) is not None]
        xs = [x for x, _, _ in points]
        categorical = not all(_number(x) for x in xs)
        if categorical:
            labels = list(dict.fromkeys(str(x) for x in xs))
            xs = [labels.index(str(x)) for x in xs]
            ax.set_xticks(range(len(labels)), labels)
        for i, r in enumerate(rounds):
            sel = [(x, y) for x, (_, y, t) in zip(xs, points) if t["round"] == r]
            if sel:
                ax.scatter(*zip(*sel), s=28, alpha=0.8, color=f"C{i % 10}",
                           label=f"round {r}" if len(rounds) > 1 else None)
        bx = best["params"].get(p)
        if bx is not None:
            bx = labels.index(str(bx)) if categorical else bx
            ax.scatter([bx], [scale * best["metrics"][metric]], marker="*", s=160, color="red",
                       zorder=3, label=f"best ({ranked_by})")
        if not categorical and (p in log_params or _spans(xs, 100)):
            ax.set_xscale("log")
            logged.append(p)
        ax.set(xlabel=p + (" (log scale)" if p in logged else ""),
               ylabel=metric + (" (%)" if scale != 1.0 else ""))
        ax.grid(alpha=0.3)
    for ax in axes[len(params):]:
        ax.set_visible(False)
    axes[0].legend(fontsize=8)
    fig.suptitle(f"{metric} against each hyperparameter ({len(scored)} trials)")
    _save(fig, path)
    return (f"{metric} of every finished trial against each searched value; the red star is the "
            f"search's best trial by {ranked_by} (trial {best['id']}: "
            + ", ".join(f"{p}={_cell(best['params'].get(p))}" for p in params)
            + f"; {metric} {_metric_cell(metric, best['metrics'][metric])})."
            + (f" Log axes: {', '.join(logged)}." if logged else ""))


# --- drawing and writing ------------------------------------------------------------------------

def _metric_cell(key: str, value) -> str:
    """A table cell; accuracies as percentages, as the plots show them."""
    if "accuracy" in key and _number(value):
        return f"{100 * value:.2f}%"
    return _cell(value)


def _figure(rows: int, cols: int, height: float, width: float | None = None):
    # Figure without pyplot: no global state, no GUI backend, safe in worker threads.
    from matplotlib.figure import Figure
    fig = Figure(figsize=(width or 5.6 * cols, height), layout="constrained")
    axes = fig.subplots(rows, cols, squeeze=False).ravel().tolist()
    for ax in axes:
        ax.grid(alpha=0.3)
    return fig, axes


def _line(ax, xs, ys, label, **kw) -> None:
    pts = [(x, y) for x, y in zip(xs, ys) if y is not None]
    if pts:
        ax.plot(*zip(*pts), label=label, **kw)


def _save(fig, path: Path) -> None:
    fig.savefig(path, dpi=DPI)


def _values(rows: list[dict], key: str) -> list[float]:
    return [r[key] for r in rows if _number(r.get(key))]


def _spans(values, ratio: float) -> bool:
    """Whether positive values span more than `ratio` (a log axis reads them better)."""
    pos = [v for v in values if _number(v) and v > 0]
    return bool(pos) and max(pos) / min(pos) > ratio


def _number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _positive(v):
    return v if v is not None and v > 0 else float("nan")


def _cell(v) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def _safe(name: str) -> str:
    return "".join(c if c.isalnum() else "_" for c in name)


def _json_or_none(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def _html(report: Report) -> str:
    e = html.escape
    parts = ["<!doctype html>", '<html><head><meta charset="utf-8">',
             f"<title>{e(report.title)}</title>",
             "<style>body{font-family:Helvetica,Arial,sans-serif;margin:2em;max-width:1400px}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;"
             "padding:3px 8px;text-align:right}th{background:#f3f3f3}td.k{text-align:left}"
             ".warn{background:#fdecea;border-left:4px solid #d93025;padding:.5em 1em}"
             "figure{margin:1.5em 0}img{max-width:100%;border:1px solid #eee}"
             "figcaption{color:#444;max-width:900px}</style></head><body>",
             f"<h1>{e(report.title)}</h1>", "<table>"]
    parts += [f'<tr><td class="k">{e(k)}</td><td class="k">{e(v)}</td></tr>'
              for k, v in report.facts]
    parts.append("</table>")
    if report.warnings:
        parts.append('<div class="warn"><b>Warnings</b><ul>')
        parts += [f"<li>{e(w)}</li>" for w in report.warnings]
        parts.append("</ul></div>")
    for name, caption in report.figures:
        parts.append(f'<figure><img src="{e(name)}" alt="{e(name)}">'
                     f"<figcaption>{e(caption)}</figcaption></figure>")
    if report.table:
        header, rows = report.table
        parts.append("<table><tr>" + "".join(f"<th>{e(h)}</th>" for h in header) + "</tr>")
        parts += ["<tr>" + "".join(f"<td>{e(c)}</td>" for c in row) + "</tr>" for row in rows]
        parts.append("</table>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"
