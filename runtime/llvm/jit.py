"""Compiling LLVM IR for this CPU, with an on-disk cache of object code, and finding the BLAS.

The target machine gets the host CPU's own name and features, so AVX2 or AVX-512 are used where
they exist (llvmlite emits plain SSE2 otherwise). Object code is cached under
$GRAPHC_CACHE_DIR (default: the user cache folder) keyed by a hash of what the IR is generated
from (the kernel plans), the renderer's code, the CPU and llvmlite's version: the cache holds only
code this compiler generated from IR it wrote itself.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from graphc.cache import cache_dir, cpu_key
from graphc.runtime.artifact import atomic_write

log = logging.getLogger("graphc")

CODEGEN_VERSION = "1"     # bump when the renderer's output changes meaning for the same IR


@functools.cache
def _llvm():
    import llvmlite.binding as llvm
    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    _register_libm(llvm)
    return llvm


@functools.cache
def target_machine():
    """The machine code is generated for (shared by every compilation)."""
    return new_target_machine()


def new_target_machine():
    llvm = _llvm()
    target = llvm.Target.from_default_triple()
    return target.create_target_machine(cpu=llvm.get_host_cpu_name(),
                                        features=llvm.get_host_cpu_features().flatten(),
                                        opt=3, codemodel="jitdefault")


@functools.cache
def cpu_description() -> str:
    llvm = _llvm()
    return f"{llvm.get_host_cpu_name()} {llvm.get_host_cpu_features().flatten()}"


def _register_libm(llvm) -> None:
    """Generated code calls the C math library (expf, logf, ...); tell the JIT where it is."""
    import ctypes.util
    libm = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
    for base in ("exp", "log", "pow", "tanh", "log1p", "sqrt", "fmax", "fmin", "erf"):
        for name in (base, base + "f"):
            if hasattr(libm, name):
                llvm.add_symbol(name, ctypes.cast(getattr(libm, name), ctypes.c_void_p).value)


def _key(source: str) -> str:
    import llvmlite
    h = hashlib.sha256()
    for part in (CODEGEN_VERSION, llvmlite.__version__, cpu_key(), _renderer_digest(), source):
        h.update(part.encode())
        h.update(b"\0")
    return h.hexdigest()[:40]


@functools.cache
def _renderer_digest() -> str:
    """A hash of the code that turns plans into machine code (the renderer and this module), so
    an edited renderer never reads object code the old one made."""
    from importlib.util import find_spec  # finds the files without importing the modules
    h = hashlib.sha256()
    for module in ("graphc.kernels.ir", "graphc.runtime.llvm.codegen",
                   "graphc.runtime.llvm.lowering", __name__):
        h.update(Path(find_spec(module).origin).read_bytes())
    return h.hexdigest()


def object_name(source: str) -> str:
    """The cache file of the object code generated from `source`, relative to the cache folder."""
    return f"llvm/{_key(source)}.o"


def object_code(source: str, render: Callable[[], str], need: bool = True) -> bytes | None:
    """Optimized object code for the IR module that `render()` writes, from the cache when it is
    there. `source` is what the module is generated from (the cache key; cheaper than the IR
    text). With `need=False` the caller only wants it cached: a hit reads nothing, returns None."""
    path = cache_dir() / object_name(source)
    if not need and path.is_file():
        log.debug("llvm cache hit %s", path.name)
        return None
    try:
        data = path.read_bytes()
        log.debug("llvm cache hit %s", path.name)
        return data
    except OSError:
        pass
    data = compile_ir(render())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, data)
    except OSError as err:            # a read-only cache is not an error, just a slower start
        log.debug("llvm cache not written: %s", err)
    return data


def optimized_module(text: str):
    llvm = _llvm()
    tm = target_machine()
    mod = llvm.parse_assembly(text)
    mod.triple = tm.triple
    mod.data_layout = str(tm.target_data)
    mod.verify()
    pto = llvm.create_pipeline_tuning_options(speed_level=3)
    pto.loop_vectorization = True
    pto.slp_vectorization = True
    pb = llvm.create_pass_builder(tm, pto)
    pb.getModulePassManager().run(mod, pb)
    return mod


def compile_ir(text: str) -> bytes:
    return target_machine().emit_object(optimized_module(text))


class Compiled:
    """Loaded object code; keeps its engine (and so the code) alive."""

    def __init__(self, obj: bytes):
        llvm = _llvm()
        tm = new_target_machine()     # the engine takes ownership of its target machine
        empty = llvm.parse_assembly("")
        empty.triple = tm.triple
        self.engine = llvm.create_mcjit_compiler(empty, tm)
        self.engine.add_object_file(llvm.ObjectFileRef.from_data(obj))
        self.engine.finalize_object()

    def address(self, symbol: str) -> int:
        address = self.engine.get_function_address(symbol)
        assert address, f"internal error: {symbol} not found in compiled code"
        return address


@dataclass(frozen=True)
class Blas:
    """The CBLAS that numpy links: gemm addresses and its integer width."""
    sgemm: int = 0
    dgemm: int = 0
    int_bits: int = 64


@functools.cache
def blas() -> Blas:
    """numpy's BLAS, or an empty Blas when none is found (then generated loops do every matrix
    product)."""
    import numpy as np
    candidates = []
    libs = Path(np.__file__).resolve().parent.parent / "numpy.libs"
    if libs.is_dir():
        candidates += sorted(str(p) for p in libs.iterdir() if "blas" in p.name.lower())
    candidates += _mapped_blas()
    for path in candidates:
        try:
            lib = ctypes.CDLL(path)
        except OSError:
            continue
        for prefix, suffix, bits in (("scipy_cblas_", "64_", 64), ("cblas_", "64_", 64),
                                     ("scipy_cblas_", "", 32), ("cblas_", "", 32)):
            s, d = (getattr(lib, f"{prefix}{g}gemm{suffix}", None) for g in "sd")
            if s is None or d is None:
                continue
            if bits == 32 and _is_ilp64(path):
                bits = 64
            return Blas(_address(s), _address(d), bits)
    log.debug("no CBLAS found; matrix products use generated loops")
    return Blas()


def _address(fn) -> int:
    return ctypes.cast(fn, ctypes.c_void_p).value


def _is_ilp64(path: str) -> bool:
    return "64_" in Path(path).name or "ilp64" in path.lower()


def _mapped_blas() -> list[str]:
    """Shared libraries already loaded by this process (numpy's BLAS among them)."""
    try:
        maps = Path("/proc/self/maps").read_text().splitlines()
    except OSError:
        return []
    found = []
    for line in maps:
        path = line.split()[-1] if "/" in line else ""
        if "blas" in path.lower() and path not in found:
            found.append(path)
    return found
