"""Compiling LLVM IR for this CPU, with an on-disk cache of object code, and finding the BLAS.

The target machine gets the host CPU's own name and features, so AVX2 or AVX-512 are used where
they exist (llvmlite emits plain SSE2 otherwise). A program's module may come in parts, compiled
at once on separate cores. Object code is cached under $GRAPHC_CACHE_DIR (default: the user cache
folder), one file per module holding the object code of its parts, keyed by a hash of what the IR
is generated from (the kernel plans), the renderer's code, the CPU and llvmlite's version: the
cache holds only code this compiler generated from IR it wrote itself.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from graphc.backends.host import cpu_key, usable_cores
from graphc.cache import cache_dir
from graphc.files import atomic_write

log = logging.getLogger("graphc")

CODEGEN_VERSION = "1"     # bump when the renderer's output changes meaning for the same IR
MAX_THREADS = 8           # modules compiled at once, at most


@functools.cache
def _llvm():
    import llvmlite.binding as llvm
    llvm.initialize_native_target()
    llvm.initialize_native_asmprinter()
    _register_libm(llvm)
    from graphc.backends.llvm.threads import register_symbols
    register_symbols(llvm)
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


def _register_libm(llvm) -> None:
    """Generated code calls the C math library (expf, logf, ...): tell the JIT where the functions
    the lowering table declares are."""
    import ctypes.util

    from graphc.backends.llvm.lowering import libm_functions
    libm = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
    for base in libm_functions():
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
    for module in ("graphc.backends.kernels.ir", "graphc.backends.llvm.codegen",
                   "graphc.backends.llvm.lowering", "graphc.backends.llvm.threads",
                   "graphc.backends.llvm.gemm", "graphc.backends.llvm.blas", __name__):
        h.update(Path(find_spec(module).origin).read_bytes())
    return h.hexdigest()


def object_name(source: str) -> str:
    """The cache file of the object code generated from `source`, relative to the cache folder."""
    return f"llvm/{_key(source)}.objs"


def compile_threads() -> int:
    """How many modules to compile at once: the cores this process may run on."""
    return max(1, min(usable_cores(), MAX_THREADS))


def object_code(source: str, render: Callable[[], str], need: bool = True) -> bytes | None:
    """Optimized object code for the IR module that `render()` writes, from the cache when it is
    there. `source` is what the module is generated from (the cache key; cheaper than the IR
    text). With `need=False` the caller only wants it cached: a hit reads nothing, returns None."""
    objects = module_objects(source, lambda: [render()], need)
    return None if objects is None else objects[0]


def module_objects(source: str, render_parts: Callable[[], list[str]],
                   need: bool = True) -> list[bytes] | None:
    """Object code for each part of the module that `render_parts()` writes (the parts compiled
    at once), from the cache when it is there; as `object_code`."""
    path = cache_dir() / object_name(source)
    if not need and path.is_file():
        log.debug("llvm cache hit %s", path.name)
        return None
    try:
        objects = _unpack(path.read_bytes())
        log.debug("llvm cache hit %s", path.name)
        return objects
    except (OSError, ValueError):     # missing, or cut short
        pass
    objects = compile_parts(render_parts())
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(path, _pack(objects))
    except OSError as err:            # a read-only cache is not an error, just a slower start
        log.debug("llvm cache not written: %s", err)
    return objects


_MAGIC = b"graphc objects\n"       # then, per object: its length (8 bytes, little-endian), its bytes


def _pack(objects: list[bytes]) -> bytes:
    return _MAGIC + b"".join(len(o).to_bytes(8, "little") + o for o in objects)


def _unpack(data: bytes) -> list[bytes]:
    if not data.startswith(_MAGIC):
        raise ValueError("not a graphc object file")
    objects, at = [], len(_MAGIC)
    while at < len(data):
        size = int.from_bytes(data[at:at + 8], "little")
        at += 8
        if at + size > len(data):
            raise ValueError("truncated graphc object file")
        objects.append(data[at:at + size])
        at += size
    if not objects:
        raise ValueError("an empty graphc object file")
    return objects


def compile_parts(texts: list[str]) -> list[bytes]:
    """Object code for each IR module, in threads: the LLVM calls that take the time run without
    the GIL (ctypes releases it) and without llvmlite's lock (see `compile_ir`)."""
    if len(texts) == 1:
        return [compile_ir(texts[0])]
    _llvm()                           # LLVM is set up once, before the threads start
    with ThreadPoolExecutor(min(len(texts), MAX_THREADS)) as pool:
        return list(pool.map(compile_ir, texts))


def optimized_module(text: str, tm=None, context=None):
    """The module parsed and optimized (O3, vectorized) for `tm`, by default the shared target
    machine. Given a `context` (and then a `tm`) of the caller's own, the pass pipeline runs
    outside llvmlite's lock."""
    llvm = _llvm()
    tm = tm or target_machine()
    mod = llvm.parse_assembly(text, context=context)
    mod.triple = tm.triple
    mod.data_layout = str(tm.target_data)
    mod.verify()
    pto = llvm.create_pipeline_tuning_options(speed_level=3)
    pto.loop_vectorization = True
    pto.slp_vectorization = True
    pb = llvm.create_pass_builder(tm, pto)
    run = llvm.ffi.lib.LLVMPY_RunNewModulePassManager
    (run if context is None else _unlocked(run))(pb.getModulePassManager(), mod, pb)
    return mod


def compile_ir(text: str) -> bytes:
    """Object code for one IR module; safe to call from several threads at once. Each call has an
    LLVM context and a target machine of its own, which LLVM's threading rules ask for before two
    modules are compiled at once; llvmlite also serializes every call into LLVM with one lock,
    which the pass pipeline and the code generator (nearly all the time) go around."""
    tm = new_target_machine()
    return _emit_object(tm, optimized_module(text, tm, _llvm().create_context()))


def _unlocked(fn):
    """The ctypes function inside one of llvmlite's locked wrappers (as it is, if an llvmlite
    wraps it otherwise)."""
    return getattr(fn, "_cfn", fn)


def _emit_object(tm, module) -> bytes:
    """`tm.emit_object(module)`, its code generation outside llvmlite's lock."""
    ffi = _llvm().ffi
    with ffi.OutputString() as err:
        buffer = _unlocked(ffi.lib.LLVMPY_TargetMachineEmitToMemory)(tm, module, 1, err)
        if not buffer:
            raise RuntimeError(str(err))
    try:
        return ctypes.string_at(ffi.lib.LLVMPY_GetBufferStart(buffer),
                                ffi.lib.LLVMPY_GetBufferSize(buffer))
    finally:
        ffi.lib.LLVMPY_DisposeMemoryBuffer(buffer)


class Compiled:
    """Loaded object code, one object or the parts of a module (linked to each other); keeps its
    engine (and so the code) alive."""

    def __init__(self, *objects: bytes):
        llvm = _llvm()
        tm = new_target_machine()     # the engine takes ownership of its target machine
        empty = llvm.parse_assembly("")
        empty.triple = tm.triple
        self.engine = llvm.create_mcjit_compiler(empty, tm)
        for obj in objects:
            self.engine.add_object_file(llvm.ObjectFileRef.from_data(obj))
        self.engine.finalize_object()

    def address(self, symbol: str) -> int:
        address = self.engine.get_function_address(symbol)
        assert address, f"internal error: {symbol} not found in compiled code"
        return address


@dataclass(frozen=True)
class Blas:
    """The CBLAS that numpy links: gemm addresses and its integer width, and OpenBLAS's calls
    that set and read its thread count (None for another BLAS)."""
    sgemm: int = 0
    dgemm: int = 0
    int_bits: int = 64
    threads: tuple | None = None        # (set_num_threads, get_num_threads) as ctypes functions


# OpenBLAS's thread-count calls, as numpy's wheels (scipy-openblas) and a plain build name them
_THREAD_CALLS = (("scipy_openblas_set_num_threads64_", "scipy_openblas_get_num_threads64_"),
                 ("scipy_openblas_set_num_threads", "scipy_openblas_get_num_threads"),
                 ("openblas_set_num_threads64_", "openblas_get_num_threads64_"),
                 ("openblas_set_num_threads", "openblas_get_num_threads"))


def _thread_calls(lib) -> tuple | None:
    for set_name, get_name in _THREAD_CALLS:
        set_fn, get_fn = getattr(lib, set_name, None), getattr(lib, get_name, None)
        if set_fn is not None and get_fn is not None:
            set_fn.argtypes, set_fn.restype = [ctypes.c_int], None
            get_fn.argtypes, get_fn.restype = [], ctypes.c_int
            return set_fn, get_fn
    return None


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
            return Blas(_address(s), _address(d), bits, _thread_calls(lib))
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
