"""The build cache answers a `graphc build` only with an artifact built from the same source and
the same options, and the suite never reads or writes the user's cache."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

from graphc import build_cache
from graphc.cache import cache_dir
from graphc.cli import main

MLP = "models/mnist_mlp.nn"


def test_the_suite_has_its_own_empty_cache():
    here = cache_dir().resolve()
    assert here.is_relative_to(Path(tempfile.gettempdir()).resolve())
    assert here.name.startswith("graphc-test-cache-")
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    assert here != (Path(base) / "graphc").resolve()


def _options(**changed) -> dict:
    options = {"model": None, "seed": None, "backend": "numpy", "precision": "f32", "werror": False}
    return options | changed


@pytest.mark.parametrize("change", [{"model": "m"}, {"seed": 1}, {"backend": "llvm"},
                                    {"backend": "cuda"}, {"precision": "tf32"}, {"werror": True}])
def test_every_build_option_changes_the_key(change):
    source = Path(MLP).read_bytes()
    assert build_cache.build_key(MLP, source, _options(**change)) != \
        build_cache.build_key(MLP, source, _options())
    assert build_cache.build_key(MLP, source, _options()) == build_cache.build_key(MLP, source, _options())


def test_a_key_needs_every_build_option():
    with pytest.raises(AssertionError, match="internal error: build options"):
        build_cache.build_key(MLP, b"", {"model": None, "seed": None, "backend": "numpy"})


def test_a_build_with_other_options_is_not_a_stale_hit(tmp_path, capsys):
    assert main(["build", MLP, "-o", str(tmp_path / "f32")]) == 0
    assert main(["build", MLP, "-o", str(tmp_path / "f32-again")]) == 0      # a hit, the same
    assert (tmp_path / "f32-again" / "params.npz").read_bytes() == \
        (tmp_path / "f32" / "params.npz").read_bytes()
    capsys.readouterr()
    # tf32 is refused off the cuda backend: the cached f32 numpy build must not answer for it
    assert main(["build", MLP, "-o", str(tmp_path / "tf32"), "--precision", "tf32"]) == 1
    assert "precision tf32 runs matrix products on a GPU" in capsys.readouterr().err
    assert not (tmp_path / "tf32" / "manifest.json").exists()


def test_werror_is_checked_after_a_build_without_it(tmp_path, capsys):
    model = tmp_path / "lint.nn"
    model.write_text("model m {\n input x: f32[N, 4]\n param W1: f32[4, 8] = zeros()\n"
                     " param W2: f32[8, 2] = kaiming()\n output relu(x @ W1) @ W2\n}\n")
    assert main(["build", str(model), "-o", str(tmp_path / "a")]) == 0
    warned = capsys.readouterr().err
    assert "warning: weight W1 starts as a constant" in warned
    assert main(["build", str(model), "-o", str(tmp_path / "b"), "--Werror"]) == 1
    assert "error" in capsys.readouterr().err
    # and the warnings come back on a hit, as the build printed them
    assert main(["build", str(model), "-o", str(tmp_path / "c")]) == 0
    assert capsys.readouterr().err.strip() == warned.strip()


def test_auto_is_keyed_as_the_backend_it_stands_for(monkeypatch):
    source = Path(MLP).read_bytes()
    import graphc.targets as targets
    monkeypatch.setattr(targets, "auto_backend", lambda: "numpy")
    as_numpy = build_cache.build_key(MLP, source, _options(backend="auto"))
    monkeypatch.setattr(targets, "auto_backend", lambda: "llvm")
    assert build_cache.build_key(MLP, source, _options(backend="auto")) != as_numpy
