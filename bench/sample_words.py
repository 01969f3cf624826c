"""How word-like a character model's samples are: the share of the words `graphc sample` prints
that occur in the training text (docs/training.md, "The GPT on Tiny Shakespeare", quotes it).

    python bench/sample_words.py RUN [--text ../shared/data/tinyshakespeare/input.txt]
        [--seeds 5] [--temperatures 1,0.8] [--tokens 500] [--prompt "ROMEO:"]

For each temperature, samples `--tokens` characters after the prompt with `--seed` 1 to `--seeds`
(`python -m graphc sample`, one process each), splits the generated text (the prompt left out)
into words (runs of letters and apostrophes) and prints the share found, case ignored, among the
words of `--text`: one line per temperature, each seed's share and their mean.
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
from pathlib import Path

WORD = re.compile(r"[A-Za-z']+")


def words(text: str) -> list[str]:
    return [w.lower() for w in WORD.findall(text)]


def known_share(generated: str, vocabulary: set[str]) -> float:
    found = words(generated)
    return sum(w in vocabulary for w in found) / max(len(found), 1)


def sample(run: str, prompt: str, tokens: int, seed: int, temperature: str) -> str:
    out = subprocess.run([sys.executable, "-m", "graphc", "sample", run, "--prompt", prompt,
                          "--tokens", str(tokens), "--seed", str(seed), "--temperature", temperature],
                         capture_output=True, text=True, check=True).stdout
    return out.removeprefix(prompt)


def main() -> None:
    repo = Path(__file__).resolve().parent.parent
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run")
    parser.add_argument("--text", default=str(repo.parent / "shared/data/tinyshakespeare/input.txt"))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--temperatures", default="1,0.8")
    parser.add_argument("--tokens", type=int, default=500)
    parser.add_argument("--prompt", default="ROMEO:")
    args = parser.parse_args()
    vocabulary = set(words(Path(args.text).read_text(encoding="utf-8")))
    for temperature in args.temperatures.split(","):
        shares = [known_share(sample(args.run, args.prompt, args.tokens, seed, temperature), vocabulary)
                  for seed in range(1, args.seeds + 1)]
        print(f"temperature {temperature}: " + ", ".join(f"{s:.2f}" for s in shares)
              + f"; mean {sum(shares) / len(shares):.2f} of the words occur in {Path(args.text).name}")


if __name__ == "__main__":
    main()
