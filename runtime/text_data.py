"""Text data for character-level language models: a UTF-8 file read whole (bounded), its character
vocabulary, the customary split (the first 90% to train on, the rest to validate), and batches of
random windows: inputs i64[N, T] and targets the same windows shifted by one character."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from graphc.errors import error
from graphc.files import open_regular

MAX_TEXT_BYTES = 256 * 2**20      # a text data set is read into memory whole
VAL_FRACTION = 0.1                # nanoGPT's and char-rnn's split of Tiny Shakespeare


@dataclass
class TextData:
    """A text as token ids over its character vocabulary, split into train and val."""
    source: str
    vocab: str                      # the characters, in code-point order: id i is vocab[i]
    context: int                    # T, the window length
    splits: dict[str, np.ndarray]   # "train", "val": int64 token ids

    @property
    def vocab_size(self) -> int:
        return len(self.vocab)

    def batch(self, split: str, n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """n windows at random starts: (inputs [n, T], the next characters [n, T])."""
        ids = self.splits[split]
        start = rng.integers(0, len(ids) - self.context, n)
        offsets = start[:, None] + np.arange(self.context)
        return ids[offsets], ids[offsets + 1]

    def windows(self, split: str) -> tuple[np.ndarray, np.ndarray]:
        """The whole split as consecutive non-overlapping windows (what a full evaluation reads)."""
        ids = self.splits[split]
        count = (len(ids) - 1) // self.context
        offsets = np.arange(count)[:, None] * self.context + np.arange(self.context)
        return ids[offsets], ids[offsets + 1]

    def encode(self, text: str) -> np.ndarray:
        index = {c: i for i, c in enumerate(self.vocab)}
        unknown = sorted({c for c in text if c not in index})
        if unknown:
            raise error(f"characters not in the model's vocabulary: {''.join(unknown)[:40]!r}",
                        hint=f"the vocabulary has {len(self.vocab)} characters: "
                             f"{self.vocab[:80]!r}")
        return np.fromiter((index[c] for c in text), np.int64, len(text))

    def decode(self, ids) -> str:
        return "".join(self.vocab[int(i)] for i in ids)

    def describe(self) -> dict:
        return {"source": self.source, "vocab": self.vocab, "context": self.context,
                "sizes": {k: int(len(v)) for k, v in self.splits.items()}}


def read_text(path: Path) -> str:
    """The file as text, refused past MAX_TEXT_BYTES or where it is not UTF-8 (naming the byte)."""
    with open_regular(path) as f:
        raw = f.read(MAX_TEXT_BYTES + 1)
    if len(raw) > MAX_TEXT_BYTES:
        raise error(f"over the limit of {MAX_TEXT_BYTES:,} bytes for a text data set", file=path)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw[:err.start].count(b"\n") + 1
        raise error(f"not UTF-8 text: byte 0x{raw[err.start]:02X} at offset {err.start:,} "
                    f"(line {line})", file=path) from None


def load_text(path: Path, context: int, val_fraction: float = VAL_FRACTION,
              vocab: str | None = None) -> TextData:
    """The text of `path` with its vocabulary (or `vocab`, a trained model's), split
    train | val at the given fraction, every split long enough for a window and its target."""
    text = read_text(path)
    chars = "".join(sorted(set(text)))
    if vocab is None:
        vocab = chars
        if len(vocab) < 2:
            raise error(f"the text has {len(vocab)} distinct character(s): nothing to predict",
                        file=path)
    data = TextData(str(path), vocab, context, {})
    ids = data.encode(text)
    cut = int(len(ids) * (1.0 - val_fraction))
    data.splits = {"train": ids[:cut], "val": ids[cut:]}
    for split, part in data.splits.items():
        if len(part) <= context:
            raise error(f"the {split} split holds {len(part):,} characters, too few for one window "
                        f"of context {context} and its target ({context + 1} characters)",
                        file=path, hint="use a longer text or a shorter context")
    return data


def check_model(program, data: TextData, features: str, labels: str) -> None:
    """The model reads windows of the data's context and scores at least its vocabulary."""
    for name in (features, labels):
        t = program.train_inputs[name]
        if not (t.dtype.is_int and t.ndim == 2 and t.shape[1] == data.context):
            raise error(f"model {program.name}: text data of context {data.context} feeds "
                        f"{name} windows of i64[N, {data.context}]; {name} is {t}",
                        hint=f"declare input {name}: i64[N, {data.context}], or set context="
                             f"{t.shape[-1] if t.ndim else '...'} in text(...)")
    out = program.graphs["forward"].output_map[program.outputs[0]].type
    classes = out.shape[-1] if out.ndim else None
    if not isinstance(classes, int) or classes < data.vocab_size:
        raise error(f"model {program.name}: the text has {data.vocab_size} distinct characters, "
                    f"but the output {program.outputs[0]} is {out}, scoring {classes} of them",
                    hint=f"make the last axis of {program.outputs[0]} (and the embedding's "
                         f"vocabulary) {data.vocab_size}")


def trained_vocab(program) -> str | None:
    """The vocabulary a trained model was trained on (its run's or artifact's `text` entry)."""
    return (program.meta.get("text") or {}).get("vocab")


def load_text_data(settings, base_dir, vocab: str | None = None) -> TextData:
    """The text a train block's `data = text(FILE, context=T)` names, FILE taken from `base_dir`
    where relative (the .nn file's folder), with a trained model's `vocab` where given."""
    options = settings.data.options
    path = Path(options["path"])
    return load_text(path if path.is_absolute() else Path(base_dir) / path, int(options["context"]),
                     vocab=vocab)
