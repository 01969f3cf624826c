"""A grammar-aware fuzzer of graphc's front end: mutates the .nn files in models/ (their parse
trees and their tokens), runs `graphc check` on each mutant and reports internal errors, hangs
and errors without a `file:line:col` location.

    python tools/fuzz_frontend.py --count 10000 --seed 1234 --out /tmp/fuzz

Each failing mutant is written to --out, one per distinct failure (`--minimize` shrinks it
first); tests/test_frontend_fuzz.py runs a few hundred mutants of a fixed seed on every test run.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import multiprocessing
import os
import random
import re
import signal
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MODELS = ROOT / "models"

# --- what mutations draw from ------------------------------------------------------------------------

_NUMBERS = ["0", "1", "2", "3", "7", "10", "0.5", "1e-3", "-1", "255", "256", "1000000",
            "2147483647", "2147483648", "4294967296", "9223372036854775807",
            "9223372036854775808", "1" + "0" * 30, "9" * 400, "1" * 5000, "1e308", "1e309",
            "1e-400", "0.0", "1.", ".5", "00012", "65536"]
_DIMS = ["0", "1", "2", "N", "M", "B", "2147483647", "2147483648", "65536", "99999999999",
         "9223372036854775808", "1" + "0" * 20, "4294967296"]
_PUNCT = ["(", ")", "[", "]", "{", "}", ",", "=", ":", ";", "->", "+", "-", "*", "/", "@", "**",
          "<", ">", "==", "!=", "<=", ">=", "."]
_KEYWORDS = ["model", "train", "search", "def", "input", "param", "output", "as", "true",
             "false", "weights", "biases", "loss", "f32", "f64", "f16", "bf16", "i32", "i64",
             "bool", "N"]
_STRINGS = ['""', '"x"', '"data.npz"', '"../../etc/passwd"', '"' + "a" * 300 + '"']
_ODD_BYTES = [b"\xff", b"\xe9", b"\x00", b"\xc3", "\u00e9".encode(), "\u200b".encode(), b"\t",
              b"\r", b"\r\n", b"#"]
_TOKEN = re.compile(r'#[^\n]*|"[^"\n]*"|[0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?\.?|[A-Za-z_]\w*|'
                    r'->|\*\*|[<>=!]=|\s+|.', re.S)


def _builtins() -> tuple[list[str], list[str], list[str]]:
    """The functions a model may call, those a train block may, and every option name."""
    from graphc.frontend.calls import CALLABLE_OPS, LAYERS
    from graphc.frontend.train_spec import SETTINGS
    from graphc.initializers import INITIALIZERS
    model = {*CALLABLE_OPS, *LAYERS, "dropout"}
    options = {a for op in CALLABLE_OPS.values() for a in op.attrs}
    options |= {o for spec in INITIALIZERS.values() for o in spec.options}
    train = set(INITIALIZERS)
    for _, table in SETTINGS.values():
        if isinstance(table, dict):
            train |= set(table)
            options |= {o for opts in table.values() for o in opts}
    return sorted(model), sorted(train), sorted(options | {"p", "bias", "eps", "momentum"})


@dataclass
class Corpus:
    texts: list[str]
    exprs: list[str]           # every expression written in the corpus, as text
    names: list[str]           # every name, plus the built-in functions and keywords
    functions: list[str]       # what a model calls
    settings: list[str]        # what train blocks and parameter declarations call
    kwargs: list[str]


def load_corpus(folder: Path = MODELS) -> Corpus:
    from lark import Token

    from graphc.frontend.parser import _parser
    from graphc.frontend.transform import EXPRESSION_RULES
    texts = [p.read_text(encoding="utf-8") for p in sorted(folder.glob("*.nn"))]
    exprs, names, kwargs = set(), set(_KEYWORDS), set()
    for text in texts:
        for node in _parser().parse(text).iter_subtrees():
            if node.data in EXPRESSION_RULES - {"stage_name", "stage_call", "kwarg"}:
                exprs.add(text[node.meta.start_pos:node.meta.end_pos])
            if node.data == "kwarg":
                kwargs.add(str(node.children[0]))
            names.update(str(c) for c in node.children if isinstance(c, Token) and c.type == "NAME")
    functions, settings, options = _builtins()
    return Corpus(texts, sorted(exprs), sorted(names | set(functions) | set(settings)),
                  functions, settings, sorted(kwargs | set(options)))


# --- mutations ----------------------------------------------------------------------------------------

def _spans(text: str) -> dict[str, list[tuple[int, int]]] | None:
    """Where the parse tree's pieces are: expressions, statements, calls, dims, settings."""
    from graphc.frontend.parser import _parser
    from graphc.frontend.transform import EXPRESSION_RULES
    try:
        tree = _parser().parse(text)
    except Exception:
        return None
    out: dict[str, list[tuple[int, int]]] = {"expr": [], "stmt": [], "call": [], "dim": [],
                                             "item": [], "model": []}
    for node in tree.iter_subtrees():
        span = (node.meta.start_pos, node.meta.end_pos) if not node.meta.empty else None
        if span is None:
            continue
        if node.data in EXPRESSION_RULES - {"stage_name", "stage_call", "kwarg"}:
            out["expr"].append(span)
        if node.data in ("call", "stage_call"):
            out["call"].append(span)
        if node.data in ("input_decl", "param_decl", "output_decl", "binding", "setting"):
            out["stmt"].append(span)
        if node.data == "dim":
            out["dim"].append(span)
        if node.data in ("model", "train", "search", "def_fn"):
            out["item"].append(span)
        if node.data in ("model", "def_fn"):
            out["model"].append(span)
    return out


def _wrap(rng: random.Random, corpus: Corpus, e: str) -> str:
    f = rng.choice(corpus.functions)
    return rng.choice([
        f"{f}({e})", f"{f}({e}, {rng.choice(_NUMBERS)})", f"-{e}", f"[{e}]", f"({e})",
        f"{e} + {e}", f"{e} -> {f}", f"{e} @ {e}", f"{e} ** {rng.choice(_NUMBERS)}",
        f"{e} * {rng.choice(corpus.exprs)}", f"{f}({e}, {rng.choice(corpus.kwargs)}="
        f"{rng.choice(_NUMBERS + corpus.exprs)})", f"{e} > {rng.choice(_NUMBERS)}",
        f"{e} -> {f}({rng.choice(_NUMBERS)})", f"[{e}, {rng.choice(corpus.exprs)}]"])


def _deep(rng: random.Random, e: str) -> str:
    """Nesting near and past the limit, in one of the shapes that recurse."""
    k = rng.choice([50, 150, 199, 200, 201, 260, 500, 1200])
    kind = rng.randrange(6)
    if kind == 0:
        return "relu(" * k + e + ")" * k
    if kind == 1:
        return e + " + x" * k
    if kind == 2:
        return "-" * k + e
    if kind == 3:
        return e + " -> relu" * k
    if kind == 4:
        return "[" * k + e + "]" * k
    return "(" * k + e + ")" * k


def _value(rng: random.Random, corpus: Corpus, e: str, local: list[str], depth: int = 0) -> str:
    """Something to pass: the expression at hand, a name in scope, a number, a list, a string,
    a dtype, or (rarely) another call."""
    kind = rng.randrange(10)
    if kind < 2:
        return e
    if kind < 4 and local:
        return rng.choice(local)
    if kind < 6:
        return rng.choice(_NUMBERS[:14] if rng.random() < 0.8 else _NUMBERS)
    if kind == 6:
        items = [rng.choice(_NUMBERS[:12] + local + ["N"]) for _ in range(rng.randrange(5))]
        return "[" + ", ".join(items) + "]"
    if kind == 7:
        return rng.choice(_STRINGS + ["f32", "i64", "bool", "f16", "true", "false"])
    if kind == 8 and depth < 2:
        return _random_call(rng, corpus, e, local, depth + 1)
    return rng.choice(corpus.exprs) if rng.random() < 0.3 or not local else rng.choice(local)


def _random_call(rng: random.Random, corpus: Corpus, e: str, local: list[str],
                 depth: int = 0, in_model: bool = True) -> str:
    """A call of a built-in with arguments and options drawn at random: the shape, dtype and
    attribute rules of every op are reached this way."""
    args = [_value(rng, corpus, e, local, depth) for _ in range(rng.choice([0, 1, 1, 2, 2, 3, 4]))]
    args += [f"{rng.choice(corpus.kwargs)}={_value(rng, corpus, e, local, depth)}"
             for _ in range(rng.choice([0, 0, 1, 1, 2]))]
    pool = corpus.functions if in_model == (rng.random() < 0.9) else corpus.settings
    return f"{rng.choice(pool)}({', '.join(args)})"


def _local_names(text: str, at: int, blocks: list[tuple[int, int]]) -> list[str]:
    """The names a model (or function) defines before offset `at`."""
    start = next((a for a, b in blocks if a <= at < b), None)
    if start is None:
        return []
    head = text[start:at]
    if head.startswith("def"):
        m = re.match(r"def\s+\w+\s*\(([^)]*)\)", head)
        return re.findall(r"[A-Za-z_]\w*", m.group(1)) if m else []
    return sorted(set(re.findall(r"\b(?:input|param|output)\s+([A-Za-z_]\w*)", head)) |
                  set(re.findall(r"^\s*([A-Za-z_]\w*)\s*=[^=]", head, re.M)) - {"output"})


def tree_mutation(rng: random.Random, corpus: Corpus, text: str,
                  spans: dict[str, list[tuple[int, int]]]) -> str:
    kind = rng.choice(["replace_expr", "wrap", "wrap", "deep", "dim", "dup_stmt", "drop_stmt",
                       "swap_stmt", "add_arg", "add_kwarg", "splice_item", "rename_call",
                       "call", "call", "call", "call"])
    pick = lambda key: rng.choice(spans[key]) if spans[key] else None  # noqa: E731
    if kind in ("replace_expr", "wrap", "deep", "call") and spans["expr"]:
        a, b = pick("expr")
        e = text[a:b]
        if kind == "deep" and rng.random() < 0.7:
            kind = "wrap"        # deep nesting is slow to build and always the same error
        local = _local_names(text, a, spans["model"])
        in_model = any(x <= a < y for x, y in spans["model"])
        new = (_value(rng, corpus, e, local) if kind == "replace_expr" else
               _wrap(rng, corpus, e) if kind == "wrap" else
               _random_call(rng, corpus, e, local, in_model=in_model) if kind == "call" else
               _deep(rng, e))
        return text[:a] + new + text[b:]
    if kind == "dim" and spans["dim"]:
        a, b = pick("dim")
        return text[:a] + rng.choice(_DIMS) + text[b:]
    if kind in ("dup_stmt", "drop_stmt", "swap_stmt") and spans["stmt"]:
        a, b = pick("stmt")
        if kind == "dup_stmt":
            return text[:b] + "\n    " + text[a:b] + text[b:]
        if kind == "drop_stmt":
            return text[:a] + text[b:]
        c, d = pick("stmt")
        if (a, b) == (c, d) or not (b <= c or d <= a):
            return text
        (a, b), (c, d) = sorted([(a, b), (c, d)])
        return text[:a] + text[c:d] + text[b:c] + text[a:b] + text[d:]
    if kind in ("add_arg", "add_kwarg", "rename_call") and spans["call"]:
        a, b = pick("call")
        call = text[a:b]
        if kind == "rename_call":
            head = re.match(r"[A-Za-z_]\w*", call)
            return text[:a] + rng.choice(corpus.functions) + call[head.end():] + text[b:] \
                if head else text
        arg = (rng.choice(_NUMBERS + corpus.exprs + _STRINGS) if kind == "add_arg" else
               f"{rng.choice(corpus.kwargs)}={rng.choice(_NUMBERS + corpus.exprs)}")
        inner = call[:-1].rstrip()
        sep = "" if inner.endswith("(") else ", "
        return text[:a] + inner + sep + arg + ")" + text[b:]
    if kind == "splice_item":
        donor_text = rng.choice(corpus.texts)
        other = _spans(donor_text)
        if other and other["item"]:
            a, b = rng.choice(other["item"])
            return text + "\n" + donor_text[a:b] + "\n"
    return token_mutation(rng, corpus, text)


def token_mutation(rng: random.Random, corpus: Corpus, text: str) -> str:
    tokens = _TOKEN.findall(text)
    solid = [i for i, t in enumerate(tokens) if not t.isspace() and not t.startswith("#")]
    if not solid:
        return text + rng.choice(_PUNCT)
    i = rng.choice(solid)
    t = tokens[i]
    kind = rng.choice(["delete", "duplicate", "swap", "replace", "insert", "insert"])
    if kind == "delete":
        tokens[i] = ""
    elif kind == "duplicate":
        tokens[i] = t + " " + t
    elif kind == "swap":
        j = solid[min(solid.index(i) + 1, len(solid) - 1)]
        tokens[i], tokens[j] = tokens[j], tokens[i]
    else:
        if t[0].isdigit() or t[0] == ".":
            new = rng.choice(_NUMBERS)
        elif t[0].isalpha() or t[0] == "_":
            new = rng.choice(corpus.names)
        elif t.startswith('"'):
            new = rng.choice(_STRINGS)
        else:
            new = rng.choice(_PUNCT)
        if kind == "insert":
            new = rng.choice([new, rng.choice(_PUNCT), rng.choice(_KEYWORDS),
                              rng.choice(_NUMBERS), rng.choice(_STRINGS)])
            tokens[i] = t + " " + new
        else:
            tokens[i] = new
    return "".join(tokens)


def byte_mutation(rng: random.Random, data: bytes) -> bytes:
    at = rng.randrange(len(data) + 1)
    if rng.random() < 0.3:
        return data[:at]                                  # a truncated file
    return data[:at] + rng.choice(_ODD_BYTES) + data[at:]


def mutant(corpus: Corpus, seed: int, index: int) -> bytes:
    """The index-th mutant of a run: the same bytes for the same seed, corpus and graphc."""
    rng = random.Random(f"{seed}:{index}")
    text = rng.choice(corpus.texts)
    for _ in range(rng.choice([1, 1, 2, 2, 3, 4])):
        spans = _spans(text) if rng.random() < 0.9 else None
        text = tree_mutation(rng, corpus, text, spans) if spans else \
            token_mutation(rng, corpus, text)
    data = text.encode("utf-8")
    return byte_mutation(rng, data) if rng.random() < 0.05 else data


# --- running graphc on a mutant -----------------------------------------------------------------------

class _Overtime(BaseException):
    """Raised by the alarm in a mutant that runs past the kill limit (not an Exception, so the
    CLI's handler of internal errors does not catch it)."""


def _alarm(signum, frame):
    raise _Overtime()


@dataclass
class Outcome:
    verdict: str          # accepted | located | internal | unlocated | hang
    seconds: float        # CPU time: on a shared machine, wall time measures the neighbours
    detail: str           # the first line of stderr (what makes two failures the same)


_LOCATED = re.compile(r"^(?P<file>.+?):(\d+):(\d+): (error|warning|note): ")


def check_file(path: str, hang_s: float = 2.0, kill_s: float = 30.0,
               command: tuple[str, ...] = ("check",)) -> Outcome:
    """Run `graphc check PATH` (or another command) in this process and judge its result: a
    hang is over `hang_s` of CPU time, or a run stopped after `kill_s` of wall time (one that
    waits, not computes)."""
    from graphc.cli import main
    err, out = io.StringIO(), io.StringIO()
    start = time.process_time()
    old = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, kill_s)
    try:
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = main([*command, path])
    except _Overtime:
        code = None
    except BaseException as exc:      # the CLI let something through: as bad as exit 70
        err.write(f"escaped the CLI: {type(exc).__name__}: {exc}\n")
        code = 70
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    seconds = time.process_time() - start
    text = err.getvalue()
    first = next(iter(text.splitlines()), "").replace(path, "FILE")
    if code is None or seconds > hang_s:
        return Outcome("hang", seconds, f"{seconds:.1f} s: {first}")
    if code == 0:
        return Outcome("accepted", seconds, "")
    if code != 1 or "internal error" in text or "Traceback" in text:
        return Outcome("internal", seconds, first)
    headers = [line for line in text.splitlines() if re.search(r"^\S.*?(error|warning): ", line)]
    # `check` must place every error; other commands may also refuse a whole file by name
    # ("the file holds 2 models; choose one").
    whole_file = f"{path}: error: " if command != ("check",) else None
    bad = [h for h in headers if not (_LOCATED.match(h) and h.startswith(path + ":"))
           and not (whole_file and h.startswith(whole_file))]
    if not headers or bad:
        return Outcome("unlocated", seconds, (bad or [first])[0].replace(path, "FILE"))
    return Outcome("located", seconds, first)


def failure_key(outcome: Outcome) -> str:
    """What makes two failures the same bug: the verdict and the message without its place
    and numbers."""
    detail = re.sub(r"^\S+?:\d+:\d+: ", "", outcome.detail)
    detail = re.sub(r"\d+", "#", detail)[:120]
    return f"{outcome.verdict}: {detail}"


# --- minimizing a failure -----------------------------------------------------------------------------

def minimize(data: bytes, still_fails, rounds: int = 4) -> bytes:
    """Delta debugging on lines, then on tokens: the smallest file `still_fails` accepts."""
    for unit in ("lines", "tokens", "chars"):
        if unit == "lines":
            parts = data.splitlines(keepends=True)
        elif unit == "tokens":
            parts = [t.encode("utf-8", "surrogateescape") for t in
                     _TOKEN.findall(data.decode("utf-8", "surrogateescape"))]
        else:
            parts = [data[i:i + 1] for i in range(len(data))] if len(data) < 400 else None
        if not parts:
            continue
        chunk = max(len(parts) // 2, 1)
        for _ in range(rounds * 8):
            changed = False
            i = 0
            while i < len(parts):
                trial = parts[:i] + parts[i + chunk:]
                if trial and still_fails(b"".join(trial)):
                    parts, changed = trial, True
                else:
                    i += chunk
            if not changed:
                if chunk == 1:
                    break
                chunk = max(chunk // 2, 1)
        data = b"".join(parts)
    return data


# --- the run ------------------------------------------------------------------------------------------

_STATE: dict = {}


def _worker_init(seed: int, folder: str, hang_s: float, memory_gb: float, build: bool) -> None:
    try:
        import resource
        limit = int(memory_gb * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    except (ImportError, ValueError, OSError):
        pass
    _STATE.update(corpus=load_corpus(), seed=seed, folder=Path(folder), hang_s=hang_s,
                  build=build)


def _run_one(index: int) -> tuple[int, Outcome]:
    data = mutant(_STATE["corpus"], _STATE["seed"], index)
    path = _STATE["folder"] / f"m{index}.nn"
    path.write_bytes(data)
    try:
        outcome = check_file(str(path), _STATE["hang_s"])
        if outcome.verdict == "accepted" and _STATE["build"]:
            built = check_file(str(path), _STATE["hang_s"], command=("build", "--stats"))
            if built.verdict not in ("accepted", "located"):
                built.detail = f"build: {built.detail}"
                return index, built
        return index, outcome
    finally:
        path.unlink()


def run(count: int, seed: int, jobs: int, hang_s: float = 2.0, memory_gb: float = 4.0,
        build: bool = False):
    """Yield (index, Outcome) for mutants 0..count-1, in any order."""
    with tempfile.TemporaryDirectory(prefix="graphc-fuzz-") as folder:
        os.environ.setdefault("GRAPHC_CACHE_DIR", str(Path(folder) / "cache"))
        if jobs <= 1:
            _worker_init(seed, folder, hang_s, memory_gb, build)
            for i in range(count):
                yield _run_one(i)
            return
        ctx = multiprocessing.get_context("fork")
        with ctx.Pool(jobs, _worker_init, (seed, folder, hang_s, memory_gb, build)) as pool:
            yield from pool.imap_unordered(_run_one, range(count), chunksize=8)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=1000, help="mutants to try (default 1000)")
    ap.add_argument("--seed", type=int, default=None, help="default: a fresh one, printed")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--hang", type=float, default=2.0,
                    help="CPU seconds that count as a hang (default 2)")
    ap.add_argument("--memory-gb", type=float, default=4.0, help="address-space limit per worker")
    ap.add_argument("--out", type=Path, default=None, help="write each distinct failure here")
    ap.add_argument("--minimize", action="store_true", help="shrink each failure before saving")
    ap.add_argument("--build", action="store_true",
                    help="also run `graphc build --stats` on each accepted mutant (the passes)")
    args = ap.parse_args(argv)
    seed = args.seed if args.seed is not None else random.SystemRandom().randrange(2**31)
    print(f"fuzzing the front end: {args.count} mutants of models/*.nn, seed {seed}", flush=True)
    verdicts: Counter = Counter()
    failures: dict[str, tuple[int, Outcome]] = {}
    slowest = 0.0
    start = time.perf_counter()
    for done, (index, outcome) in enumerate(run(args.count, seed, args.jobs, args.hang,
                                                 args.memory_gb, args.build), 1):
        verdicts[outcome.verdict] += 1
        slowest = max(slowest, outcome.seconds)
        if outcome.verdict in ("internal", "unlocated", "hang"):
            key = failure_key(outcome)
            if key not in failures:
                failures[key] = (index, outcome)
                print(f"  #{index} {outcome.verdict}: {outcome.detail}", flush=True)
        if done % 1000 == 0:
            print(f"  ... {done} done, {dict(verdicts)}", flush=True)
    elapsed = time.perf_counter() - start
    print(f"{args.count} mutants in {elapsed:.0f} s (slowest {slowest:.2f} s): "
          + ", ".join(f"{verdicts[v]} {v}" for v in
                      ("located", "accepted", "internal", "unlocated", "hang")))
    print(f"{len(failures)} distinct failures")
    if args.out and failures:
        _save(args.out, seed, failures, args.minimize, args.hang)
    return 1 if failures else 0


def _save(out: Path, seed: int, failures: dict, shrink: bool, hang_s: float) -> None:
    out.mkdir(parents=True, exist_ok=True)
    corpus = load_corpus()
    with tempfile.TemporaryDirectory() as folder:
        probe = Path(folder) / "probe.nn"
        for n, (key, (index, outcome)) in enumerate(sorted(failures.items())):
            data = mutant(corpus, seed, index)
            if shrink:
                def still_fails(candidate: bytes, key=key) -> bool:
                    probe.write_bytes(candidate)
                    return failure_key(check_file(str(probe), hang_s)) == key
                data = minimize(data, still_fails)
            name = out / f"{outcome.verdict}-{n:03d}.nn"
            name.write_bytes(data)
            print(f"  {name}: {key}")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    sys.exit(main())
