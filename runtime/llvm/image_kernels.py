"""Native kernels for data augmentation (runtime/augment.py): resampling a batch of images through
one affine map per image, with the noise that follows it added in the same pass, and noise alone.

Augmentation shares the cores with the compiled step (inline on two cores, a block ahead in a
thread with more): every microsecond it takes is one the step may wait for. Here each output
pixel is computed once, eight at a time, in one call that releases the GIL and reads the batch's
samples where they lie in the training set. The IR is written by hand (the kernel IR has strided
accesses only, no gathers) and compiled like every other module: for the host CPU, cached on
disk.

The arithmetic is the numpy reference's (`augment.resample`, `augment.add_noise`): source
coordinates in float32, clipped to [-1, size], zero outside the image, nearest pixel by rint or
bilinear blending as top + (top_right - top) * fc, and so on; noise as x + float32(std * z). Only
the coordinates' rounding may differ (numpy's product is a BLAS call), by an ulp.

How a plane is resampled: its rows are copied into a scratch plane with a zero border, one pixel
before and two after each side, so that source pixels clipped into [-1, size] and their
neighbours +1 need no bounds checks. Then for each run of LANES output pixels (a precomputed grid
holds their rows and columns) the coordinates are computed as vectors, and each lane's top and
bottom neighbour pairs are loaded as two-element vectors: two loads a pixel for four taps. While
a plane is computed, the next plane's pixels and noise are prefetched: the samples of a batch lie
at random in the training set, and waiting for memory took as long as the arithmetic. (Measured
and dropped: the AVX2 gather instruction, twice as slow on AMD Zen 3 as the paired loads; skipping
runs whose taps fall outside the nonzero rows and columns, whose bookkeeping cost more than the
third of MNIST's runs it skipped.)
"""
from __future__ import annotations

import ctypes
import functools
import threading

import numpy as np

from graphc.runtime.llvm import jit

_TYPES = {np.dtype(np.float32): "float", np.dtype(np.float64): "double"}
DTYPES = tuple(_TYPES)            # the image types the kernels take
_BYTES = {"float": 4, "double": 8}
LANES = 8                         # output pixels computed at once

_RESAMPLE = ctypes.CFUNCTYPE(None, *[ctypes.c_void_p] * 8, ctypes.c_float,
                             *[ctypes.c_int64] * 4)
_NOISE = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                          ctypes.c_void_p, ctypes.c_float, ctypes.c_int64, ctypes.c_int64)


def _vec(t: str, lanes: int = LANES) -> str:
    return f"<{lanes} x {t}>"


def _splat(name: str, t: str, value: str) -> str:
    """%name = `value` (of type t) in every lane."""
    return (f"  {name}.one = insertelement {_vec(t)} poison, {t} {value}, i64 0\n"
            f"  {name} = shufflevector {_vec(t)} {name}.one, {_vec(t)} poison, "
            f"{_vec('i32')} zeroinitializer\n")


def _constant(t: str, value: str) -> str:
    return "<" + ", ".join([f"{t} {value}"] * LANES) + ">"


def _mask(indices) -> str:
    return "<" + ", ".join(f"i32 {i}" for i in indices) + ">"


def _lane_indices() -> str:
    """%at.xK = lane K of %at, the element of the scratch plane a pixel reads, counted from the
    plane's first element (the border's corner), so never negative: zero-extended, which x86
    does for free, and used as the index of addressing modes from loop-invariant bases."""
    lines = []
    for k in range(LANES):
        lines += [f"  %at.i{k} = extractelement {_vec('i32')} %at, i64 {k}",
                  f"  %at.x{k} = zext i32 %at.i{k} to i64"]
    return "\n".join(lines) + "\n"


def _pairs(name: str, t: str, base: str) -> str:
    """%name.l and %name.r: each lane's pixel (element %at.xK from `base`) and its right
    neighbour, loaded as one two-element vector per lane. The pairs are laid out so that
    splitting them into lefts and rights takes in-lane shuffles only (on AVX: shufps, no
    cross-lane permute): lanes 0, 1, 4, 5 first, then 2, 3, 6, 7."""
    lines = []
    for k in range(LANES):
        lines += [f"  {name}.p{k} = getelementptr {t}, ptr {base}, i64 %at.x{k}",
                  f"  {name}.v{k} = load {_vec(t, 2)}, ptr {name}.p{k}, align {_BYTES[t]}"]
    order = [0, 1, 4, 5, 2, 3, 6, 7] if LANES == 8 else list(range(LANES))
    parts, width = [f"{name}.v{k}" for k in order], 2
    level = 0
    while len(parts) > 1:        # concatenate by halves
        joined = []
        for a in range(0, len(parts), 2):
            new = f"{name}.j{level}.{a // 2}"
            lines.append(f"  {new} = shufflevector {_vec(t, width)} {parts[a]}, "
                         f"{_vec(t, width)} {parts[a + 1]}, "
                         f"{_vec('i32', 2 * width)} {_mask(range(2 * width))}")
            joined.append(new)
        parts, width, level = joined, 2 * width, level + 1
    where = {lane: 2 * position for position, lane in enumerate(order)}   # lane -> its left
    for side, shift in (("l", 0), ("r", 1)):
        lines.append(f"  {name}.{side} = shufflevector {_vec(t, 2 * LANES)} {parts[0]}, "
                     f"{_vec(t, 2 * LANES)} poison, "
                     f"{_vec('i32')} {_mask(where[k] + shift for k in range(LANES))}")
    return "\n".join(lines) + "\n"


def _singles(name: str, t: str) -> str:
    """%name: each lane's pixel, element %at.xK of the scratch plane."""
    lines, previous = [], "poison"
    for k in range(LANES):
        value = name if k == LANES - 1 else f"{name}.s{k}"
        lines += [f"  {name}.p{k} = getelementptr {t}, ptr %scratch, i64 %at.x{k}",
                  f"  {name}.v{k} = load {t}, ptr {name}.p{k}",
                  f"  {value} = insertelement {_vec(t)} {previous}, {t} {name}.v{k}, i64 {k}"]
        previous = value
    return "\n".join(lines) + "\n"


def _plane(t: str, p: str, q: str, noise: bool) -> str:
    """%{p}.from: where plane `q` (channel q % channels of image q / channels) of the batch is
    read in src, sample index[image]; with noise, %{p}.bank: its part of the image's window."""
    text = f"""  %{p}.image = udiv i64 {q}, %channels
  %{p}.image.first = mul i64 %{p}.image, %channels
  %{p}.channel = sub i64 {q}, %{p}.image.first
  %{p}.channel.at = mul i64 %{p}.channel, %size
  %{p}.rowp = getelementptr i64, ptr %index, i64 %{p}.image
  %{p}.row = load i64, ptr %{p}.rowp
  %{p}.row.first = mul i64 %{p}.row, %channels
  %{p}.row.plane = add i64 %{p}.row.first, %{p}.channel
  %{p}.row.base = mul i64 %{p}.row.plane, %size
  %{p}.from = getelementptr {t}, ptr %src, i64 %{p}.row.base
"""
    if noise:
        text += f"""  %{p}.offp = getelementptr i64, ptr %offsets, i64 %{p}.image
  %{p}.off = load i64, ptr %{p}.offp
  %{p}.bank.at = add i64 %{p}.off, %{p}.channel.at
  %{p}.bank = getelementptr float, ptr %normals, i64 %{p}.bank.at
"""
    return text


def _prefetch(t: str, noise: bool) -> str:
    """Blocks `ahead` to `ahead.done`: ask for the next plane's pixels (and its noise) in the
    cache while this one is computed; the samples lie at random in the training set, and waiting
    for memory took as long as the arithmetic."""
    lines = f"""ahead:
  %ahead.q = add i64 %q, 1
  %ahead.any = icmp ult i64 %ahead.q, %planes
  br i1 %ahead.any, label %ahead.where, label %ahead.done

ahead.where:
{_plane(t, "next", "%ahead.q", noise)}  %ahead.bytes = mul i64 %size, {_BYTES[t]}
  br label %ahead.line

ahead.line:
  %line = phi i64 [ 0, %ahead.where ], [ %line.next, %ahead.line ]
  %line.p = getelementptr i8, ptr %next.from, i64 %line
  call void @llvm.prefetch.p0(ptr %line.p, i32 0, i32 3, i32 1)
"""
    if noise:
        lines += """  %line.half = lshr i64 %line, 1
  %line.bank = getelementptr i8, ptr %next.bank, i64 %line.half
  call void @llvm.prefetch.p0(ptr %line.bank, i32 0, i32 3, i32 1)
""" if t == "double" else """  %line.bank = getelementptr i8, ptr %next.bank, i64 %line
  call void @llvm.prefetch.p0(ptr %line.bank, i32 0, i32 3, i32 1)
"""
    return lines + """  %line.next = add i64 %line, 64
  %line.more = icmp ult i64 %line.next, %ahead.bytes
  br i1 %line.more, label %ahead.line, label %ahead.done

ahead.done:
"""


def _widen(t: str, name: str, value: str) -> str:
    """%name = float vector `value` as `t` (the numpy reference casts to the images' type)."""
    cast = "bitcast" if t == "float" else "fpext"      # a bitcast to the same type is a copy
    return f"  {name} = {cast} {_vec('float')} {value} to {_vec(t)}\n"


def _resample_ir(t: str, bilinear: bool, noise: bool) -> str:
    """out[i, k] = images[i, k] sampled at maps[i] @ (r, c, 1) for every pixel (r, c), for a batch
    [n, channels, h, w] of element type `t` (row-major): images[i] is src[index[i]], or src[i]
    where `index` is null. `maps` is [n, 2, 3] float32 (the first two rows of each 3 x 3
    matrix); `grid` is [2, stride] float32, every pixel's row and column with stride = h * w
    rounded up to LANES; `scratch` is one plane with a zero border ([h + 3, w + 3], zeros: the
    kernel writes only its interior). `dst` holds LANES - 1 elements more than the batch: the
    last run of a plane writes past it, into the next plane (written after) or that spare room.
    With `noise`, out += std * normals[offsets[i] + p] (p the pixel's index within image i), as
    augment.add_noise."""
    f, i32, v, b = _vec("float"), _vec("i32"), _vec(t), _vec("i1")
    name = (f"graphc_resample_{'bilinear' if bilinear else 'nearest'}"
            f"{'_noise' if noise else ''}_{t}")
    # the top left tap (bilinear) or the nearest pixel: its index in the scratch plane, per lane
    rounding = "floor" if bilinear else "rint"
    sample = f"""  %r0f = call {f} @llvm.{rounding}.v{LANES}f32({f} %sr)
  %c0f = call {f} @llvm.{rounding}.v{LANES}f32({f} %sc)
  %r0 = fptosi {f} %r0f to {i32}
  %c0 = fptosi {f} %c0f to {i32}
  %rw = mul {i32} %r0, %pitchv
  %at.in = add {i32} %rw, %c0
  %at = add {i32} %at.in, %cornerv
{_lane_indices()}"""
    if bilinear:
        sample += f"""  %frf = fsub {f} %sr, %r0f
  %fcf = fsub {f} %sc, %c0f
{_widen(t, "%fr", "%frf")}{_widen(t, "%fc", "%fcf")}{_pairs("%top", t, "%scratch")}\
{_pairs("%bot", t, "%below")}  %dt = fsub {v} %top.r, %top.l
  %mt = fmul {v} %dt, %fc
  %upper = fadd {v} %top.l, %mt
  %db = fsub {v} %bot.r, %bot.l
  %mb = fmul {v} %db, %fc
  %lower = fadd {v} %bot.l, %mb
  %dv = fsub {v} %lower, %upper
  %mv = fmul {v} %dv, %fr
  %sample = fadd {v} %upper, %mv
"""
    else:
        sample += _singles("%sample", t)
    if noise:
        # the last run of a plane reads no normals past the image's window: a masked load
        add = f"""  %zp = getelementptr float, ptr %this.bank, i64 %j
  %j.end = add i64 %j, {LANES}
  %whole = icmp ule i64 %j.end, %size
  br i1 %whole, label %run.normals, label %run.last

run.last:
  %j32 = trunc i64 %j to i32
{_splat("%jv", "i32", "%j32")}  %lane = add {i32} %jv, <{", ".join(f"i32 {k}" for k in range(LANES))}>
  %live = icmp slt {i32} %lane, %sizev
  %z.last = call {f} @llvm.masked.load.v{LANES}f32.p0(ptr %zp, i32 4, {b} %live, {f} zeroinitializer)
  br label %run.noise

run.normals:
  %z.whole = load {f}, ptr %zp, align 4
  br label %run.noise

run.noise:
  %z = phi {f} [ %z.whole, %run.normals ], [ %z.last, %run.last ]
  %s = fmul {f} %stdv, %z
{_widen(t, "%sw", "%s")}  %value = fadd {v} %sample, %sw
"""
        value, latch = "%value", "run.noise"
    else:
        add, value, latch = "", "%sample", "run"
    constants = "".join(_splat(name, t, value) for name, t, value in (
        ("%hv", "float", "%hf"), ("%wv", "float", "%wf"), ("%pitchv", "i32", "%pitch32"),
        ("%stdv", "float", "%std"), ("%sizev", "i32", "%size32"),
        ("%cornerv", "i32", "%corner32")))
    maps = "".join(f"  %m{k}.at = add i64 %m, {k}\n"
                   f"  %m{k}p = getelementptr float, ptr %maps, i64 %m{k}.at\n"
                   f"  %m{k} = load float, ptr %m{k}p\n{_splat(f'%m{k}v', 'float', f'%m{k}')}"
                   for k in range(6))
    return f"""
define void @{name}(ptr noalias nocapture readonly %src, ptr noalias nocapture readonly %index,
                    ptr noalias nocapture %dst,
                    ptr noalias nocapture readonly %maps, ptr noalias nocapture readonly %grid,
                    ptr noalias nocapture %scratch, ptr noalias nocapture readonly %normals,
                    ptr noalias nocapture readonly %offsets, float %std,
                    i64 %n, i64 %channels, i64 %h, i64 %w) #0 {{
entry:
  %planes = mul i64 %n, %channels
  %size = mul i64 %h, %w
  %pitch = add i64 %w, 3
  %corner = add i64 %w, 4
  %pitch32 = trunc i64 %pitch to i32
  %corner32 = trunc i64 %corner to i32
  %below = getelementptr {t}, ptr %scratch, i64 %pitch        ; the row below's first element
  %size32 = trunc i64 %size to i32
  %in = getelementptr {t}, ptr %scratch, i64 %corner        ; pixel (0, 0) of the scratch plane
  %hf = uitofp i64 %h to float
  %wf = uitofp i64 %w to float
  %rounded = add i64 %size, {LANES - 1}
  %stride = and i64 %rounded, {-LANES}
  %grid.cols = getelementptr float, ptr %grid, i64 %stride
{constants}  %empty = icmp eq i64 %planes, 0
  %none = icmp eq i64 %size, 0
  %skip = or i1 %empty, %none
  br i1 %skip, label %done, label %plane

plane:                                        ; one channel of one image
  %q = phi i64 [ 0, %entry ], [ %q.next, %plane.end ]
{_plane(t, "this", "%q", noise)}  %m = mul i64 %this.image, 6
{maps}  %base = mul i64 %q, %size
  %out = getelementptr {t}, ptr %dst, i64 %base
  br label %ahead

{_prefetch(t, noise)}  br label %copy

copy:                                         ; row %r into the scratch plane's interior
  %r = phi i64 [ 0, %ahead.done ], [ %r.next, %copy.row ]
  %from.at = mul i64 %r, %w
  %from = getelementptr {t}, ptr %this.from, i64 %from.at
  %to.at = mul i64 %r, %pitch
  %to = getelementptr {t}, ptr %in, i64 %to.at
  br label %copy.pixel

copy.pixel:                                   ; (a loop the vectorizer takes)
  %k = phi i64 [ 0, %copy ], [ %k.next, %copy.pixel ]
  %fp = getelementptr {t}, ptr %from, i64 %k
  %tp = getelementptr {t}, ptr %to, i64 %k
  %pixel = load {t}, ptr %fp
  store {t} %pixel, ptr %tp
  %k.next = add i64 %k, 1
  %k.more = icmp ult i64 %k.next, %w
  br i1 %k.more, label %copy.pixel, label %copy.row

copy.row:
  %r.next = add i64 %r, 1
  %r.more = icmp ult i64 %r.next, %h
  br i1 %r.more, label %copy, label %run

run:                                          ; output pixels %j ..< %j + LANES of the plane
  %j = phi i64 [ 0, %copy.row ], [ %j.next, %{latch} ]
  %grp = getelementptr float, ptr %grid, i64 %j
  %gr = load {f}, ptr %grp, align 4
  %gcp = getelementptr float, ptr %grid.cols, i64 %j
  %gc = load {f}, ptr %gcp, align 4
  %sr.a = fmul {f} %m0v, %gr
  %sr.b = fadd {f} %sr.a, %m2v
  %sr.c = fmul {f} %m1v, %gc
  %sr.raw = fadd {f} %sr.b, %sr.c
  %sc.a = fmul {f} %m3v, %gr
  %sc.b = fadd {f} %sc.a, %m5v
  %sc.c = fmul {f} %m4v, %gc
  %sc.raw = fadd {f} %sc.b, %sc.c
  %sr.lo = call {f} @llvm.maxnum.v{LANES}f32({f} %sr.raw, {f} {_constant("float", "-1.0")})
  %sr = call {f} @llvm.minnum.v{LANES}f32({f} %sr.lo, {f} %hv)
  %sc.lo = call {f} @llvm.maxnum.v{LANES}f32({f} %sc.raw, {f} {_constant("float", "-1.0")})
  %sc = call {f} @llvm.minnum.v{LANES}f32({f} %sc.lo, {f} %wv)
{sample}{add}  %op = getelementptr {t}, ptr %out, i64 %j
  store {v} {value}, ptr %op, align {_BYTES[t]}
  %j.next = add i64 %j, {LANES}
  %j.more = icmp ult i64 %j.next, %size
  br i1 %j.more, label %run, label %plane.end

plane.end:
  %q.next = add i64 %q, 1
  %q.more = icmp ult i64 %q.next, %planes
  br i1 %q.more, label %plane, label %done

done:
  ret void
}}
"""


def _noise_ir(t: str) -> str:
    """y[i, p] = x[i, p] + std * normals[offsets[i] + p] for n images of `size` elements (the
    product in float32, as the numpy reference computes it, then cast to `t`)."""
    cast = "bitcast" if t == "float" else "fpext"
    return f"""
define void @graphc_add_noise_{t}(ptr noalias nocapture readonly %x, ptr noalias nocapture %y,
                                  ptr noalias nocapture readonly %normals,
                                  ptr noalias nocapture readonly %offsets, float %std, i64 %n,
                                  i64 %size) nounwind {{
entry:
  %empty = icmp eq i64 %n, 0
  %none = icmp eq i64 %size, 0
  %skip = or i1 %empty, %none
  br i1 %skip, label %done, label %image

image:
  %i = phi i64 [ 0, %entry ], [ %i.next, %image.end ]
  %offp = getelementptr i64, ptr %offsets, i64 %i
  %off = load i64, ptr %offp
  %bank = getelementptr float, ptr %normals, i64 %off
  %base = mul i64 %i, %size
  %row = getelementptr {t}, ptr %x, i64 %base
  %out = getelementptr {t}, ptr %y, i64 %base
  br label %pixel

pixel:
  %p = phi i64 [ 0, %image ], [ %p.next, %pixel ]
  %zp = getelementptr float, ptr %bank, i64 %p
  %z = load float, ptr %zp
  %s = fmul float %std, %z
  %sw = {cast} float %s to {t}
  %xp = getelementptr {t}, ptr %row, i64 %p
  %xv = load {t}, ptr %xp
  %yv = fadd {t} %xv, %sw
  %yp = getelementptr {t}, ptr %out, i64 %p
  store {t} %yv, ptr %yp
  %p.next = add i64 %p, 1
  %p.more = icmp ult i64 %p.next, %size
  br i1 %p.more, label %pixel, label %image.end

image.end:
  %i.next = add i64 %i, 1
  %i.more = icmp ult i64 %i.next, %n
  br i1 %i.more, label %image, label %done

done:
  ret void
}}
"""


_DECLARATIONS = f"""
declare {_vec("float")} @llvm.floor.v{LANES}f32({_vec("float")})
declare {_vec("float")} @llvm.rint.v{LANES}f32({_vec("float")})
declare {_vec("float")} @llvm.maxnum.v{LANES}f32({_vec("float")}, {_vec("float")})
declare {_vec("float")} @llvm.minnum.v{LANES}f32({_vec("float")}, {_vec("float")})
declare {_vec("float")} @llvm.masked.load.v{LANES}f32.p0(ptr, i32, {_vec("i1")}, {_vec("float")})

declare void @llvm.prefetch.p0(ptr, i32, i32, i32)

; "no-builtins": the row copies stay vectorized loops, not a call to memcpy per row
attributes #0 = {{ nounwind "no-builtins" }}
"""


def module_text() -> str:
    """The whole module: resampling (nearest and bilinear, with noise or without) and noise, for
    float and double."""
    parts = [_DECLARATIONS]
    for t in _TYPES.values():
        parts += [_resample_ir(t, bilinear, noise)
                  for bilinear in (False, True) for noise in (False, True)]
        parts.append(_noise_ir(t))
    return "".join(parts)


@functools.cache
def _function(name: str, prototype):
    """The compiled function `name` (the whole module is compiled, or read from the cache, on
    the first call)."""
    return prototype(_compiled().address(name))


@functools.cache
def _compiled() -> jit.Compiled:
    text = module_text()
    return jit.Compiled(jit.object_code(text, lambda: text))


@functools.cache
def _grid(height: int, width: int) -> tuple[np.ndarray, int]:
    """[2, stride]: every pixel's row, then every pixel's column, as float32, each row padded
    with zeros to a multiple of LANES; and its address."""
    stride = -(-height * width // LANES) * LANES
    grid = np.zeros((2, stride), np.float32)
    rows, cols = np.divmod(np.arange(height * width), width)
    grid[0, :height * width], grid[1, :height * width] = rows, cols
    return grid, grid.ctypes.data


_SCRATCH = threading.local()


def _scratch(height: int, width: int, dtype: np.dtype) -> int:
    """The address of this thread's scratch plane for images of height x width: zeros, of which
    the kernels write only the interior, so that the border stays zero from call to call."""
    planes = _SCRATCH.__dict__.setdefault("planes", {})
    key = (height, width, dtype)
    if key not in planes:
        plane = np.zeros((height + 3) * (width + 3), dtype)
        planes[key] = (plane, plane.ctypes.data)
    return planes[key][1]


def resample(images: np.ndarray, maps: np.ndarray, exact: bool, noise: tuple | None = None,
             index: np.ndarray | None = None) -> np.ndarray:
    """augment.resample, natively: images [N, C, H, W] (float32 or float64), maps [n, 3, 3] or
    [n, 2, 3]; with `noise` = (normals, offsets, std), augment.add_noise of the result, in the
    same pass; with `index`, of images[index] (read where they lie: no gathered copy)."""
    _, channels, height, width = images.shape
    assert (height + 3) * (width + 3) < 2**31, "pixels of a plane are indexed with 32-bit integers"
    if not images.flags.c_contiguous:
        images, index = np.ascontiguousarray(images if index is None else images[index]), None
    if index is None:
        index = np.arange(len(images), dtype=np.int64)
    index = np.ascontiguousarray(index, dtype=np.int64)
    assert not len(index) or 0 <= index.min() <= index.max() < len(images)
    n = len(index)
    shape, size = (n, channels, height, width), channels * height * width
    rows = np.ascontiguousarray(maps[:, :2], dtype=np.float32)
    assert rows.shape == (n, 2, 3)
    # LANES - 1 spare elements: the last run of pixels writes past the last plane
    out = np.empty(n * size + LANES - 1, images.dtype)
    kind, t = "nearest" if exact else "bilinear", _TYPES[images.dtype]
    bank = offsets = None
    if noise is not None:
        normals, offsets, std = noise
        offsets = _checked_offsets(offsets, normals, n, size)
        bank, offsets = normals.ctypes.data, offsets.ctypes.data
        kind += "_noise"
    fn = _function(f"graphc_resample_{kind}_{t}", _RESAMPLE)
    fn(images.ctypes.data, index.ctypes.data, out.ctypes.data,
       rows.ctypes.data, _grid(height, width)[1], _scratch(height, width, images.dtype), bank,
       offsets, 0.0 if noise is None else noise[2], n, channels, height, width)
    return out[:n * size].reshape(shape)


def add_noise(x: np.ndarray, normals: np.ndarray, offsets: np.ndarray, std: float) -> np.ndarray:
    """x + std * normals[offsets[i]:offsets[i] + size] for each image i of x (a new array)."""
    x = np.ascontiguousarray(x)
    n, size = len(x), x[0].size if len(x) else 0
    offsets = _checked_offsets(offsets, normals, n, size)
    out = np.empty_like(x)
    fn = _function(f"graphc_add_noise_{_TYPES[x.dtype]}", _NOISE)
    fn(x.ctypes.data, out.ctypes.data, normals.ctypes.data, offsets.ctypes.data, std, n, size)
    return out


def _checked_offsets(offsets: np.ndarray, normals: np.ndarray, n: int, size: int) -> np.ndarray:
    """The noise windows' offsets as int64, each window normals[offset:offset + size] inside the
    bank (the kernels read through bare addresses)."""
    offsets = np.ascontiguousarray(offsets, dtype=np.int64)
    assert normals.dtype == np.float32 and normals.flags.c_contiguous
    assert len(offsets) == n and (not n or (offsets.min() >= 0 and
                                            offsets.max() <= len(normals) - size))
    return offsets
