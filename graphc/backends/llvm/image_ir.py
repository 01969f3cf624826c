"""The LLVM IR of the augmentation kernels, written by hand (the kernel IR has strided accesses
only, no gathers); image_kernels.py compiles and calls them.

An image is resampled in two passes. First its map is applied to every output pixel, LANES at a
time, by fused multiply-adds: where each pixel reads in the scratch plane (an int32) and, for
blending, its two fractions go to a small buffer (once per image, for all its channels). Then
each channel's rows are copied into a scratch plane with a zero border, one pixel before and two
after each side, so that source pixels clipped into [-1, size] and their neighbours +1 need no
bounds checks; for each run of LANES output pixels the lanes' indices are read back as plain
integer loads, and each lane's top and bottom neighbour pairs loaded as two-element vectors: two
loads a pixel for four taps. Noise that follows is added in the same pass. Meanwhile the same
channel of the image AHEAD images later (pixels and noise) is prefetched into L2, a cache line or
two per run. docs/training.md ("Augmentation") has the measurements behind these choices.

The arithmetic is the numpy reference's (`augment.resample`, `augment.add_noise`): source
coordinates in float32, clipped to [-1, size], zero outside the image, nearest pixel by rint or
bilinear blending as top + (top_right - top) * fc, and so on; noise as x + float32(std * z). Only
the coordinates' rounding may differ, by an ulp: numpy's product of maps and pixel grid is a
BLAS call, the kernels' two fused multiply-adds (whole-pixel maps give whole coordinates either
way, so copies are the same pixels).
"""
from __future__ import annotations

IR_TYPES = ("float", "double")   # the image element types, as LLVM names them
_BYTES = {"float": 4, "double": 8}
_SHORT = {"float": "f32", "double": "f64"}
LANES = 8                         # output pixels computed at once
# Planes with their border have fewer elements than this: the kernels compute where a pixel
# reads as a float32 integer, exact below 2**24.
PIXELS = 2**24
# While an image is resampled, the one this many images later is prefetched into L2.
AHEAD = 3


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


_STEPS = _mask(range(LANES))      # 0, 1, ..., LANES - 1


def _lane_indices() -> str:
    """%at.xK: the element of the scratch plane that pixel %j + K reads, counted from the plane's
    first element (the border's corner), so never negative: read back from the coordinates pass
    as 32-bit integers (zero-extended for free) and used as the index of addressing modes from
    loop-invariant bases."""
    lines = []
    for k in range(LANES):
        lines += [f"  %at.p{k} = getelementptr i32, ptr %at.run, i64 {k}",
                  f"  %at.i{k} = load i32, ptr %at.p{k}, align 4",
                  f"  %at.x{k} = zext i32 %at.i{k} to i64"]
    return "  %at.run = getelementptr i32, ptr %coords, i64 %j\n" + "\n".join(lines) + "\n"


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


def _plane(t: str, p: str, image: str, channel: str, noise: bool) -> str:
    """%{p}.from: where channel `channel` of image `image` of the batch is read in src, sample
    index[image]; with noise, %{p}.bank: its part of the image's window."""
    text = f"""  %{p}.rowp = getelementptr i64, ptr %index, i64 {image}
  %{p}.row = load i64, ptr %{p}.rowp
  %{p}.row.first = mul i64 %{p}.row, %channels
  %{p}.row.plane = add i64 %{p}.row.first, {channel}
  %{p}.row.base = mul i64 %{p}.row.plane, %size
  %{p}.from = getelementptr {t}, ptr %src, i64 %{p}.row.base
"""
    if noise:
        text += f"""  %{p}.offp = getelementptr i64, ptr %offsets, i64 {image}
  %{p}.off = load i64, ptr %{p}.offp
  %{p}.channel.at = mul i64 {channel}, %size
  %{p}.bank.at = add i64 %{p}.off, %{p}.channel.at
  %{p}.bank = getelementptr float, ptr %normals, i64 %{p}.bank.at
"""
    return text


def _widen(t: str, name: str, value: str) -> str:
    """%name = float vector `value` as `t` (the numpy reference casts to the images' type)."""
    cast = "bitcast" if t == "float" else "fpext"      # a bitcast to the same type is a copy
    return f"  {name} = {cast} {_vec('float')} {value} to {_vec(t)}\n"


def _masked_load(name: str, t: str, pointer: str, mask: str) -> str:
    """%name = the lanes of `mask` loaded from `pointer`, zeros in the others."""
    return (f"  {name} = call {_vec(t)} @llvm.masked.load.v{LANES}{_SHORT[t]}.p0(ptr {pointer}, "
            f"i32 {_BYTES[t]}, {_vec('i1')} {mask}, {_vec(t)} zeroinitializer)\n")


def _coordinates(t: str, bilinear: bool) -> str:
    """Block `where`, the first pass over an image: for each run of LANES output pixels %u, the
    source coordinates (grid rows and columns through the map by fused multiply-adds, clipped),
    and where its pixel (nearest) or top left tap (bilinear) lies in the scratch plane, to
    coords[%u]; for blending, the fractions to fracs[%u] and fracs[stride + %u], as `t`. That
    index is computed in float32 too, row * pitch + (col + corner), exact below PIXELS: three
    operations where converting row and column to integers first took five."""
    f, i32, v = _vec("float"), _vec("i32"), _vec(t)
    rounding = "floor" if bilinear else "rint"
    text = f"""where:
  %u = phi i64 [ 0, %image ], [ %u.next, %where ]
  %grp = getelementptr float, ptr %grid, i64 %u
  %gr = load {f}, ptr %grp, align 4
  %gcp = getelementptr float, ptr %grid.cols, i64 %u
  %gc = load {f}, ptr %gcp, align 4
  %sr.b = call {f} @llvm.fma.v{LANES}f32({f} %m0v, {f} %gr, {f} %m2v)
  %sr.raw = call {f} @llvm.fma.v{LANES}f32({f} %m1v, {f} %gc, {f} %sr.b)
  %sc.b = call {f} @llvm.fma.v{LANES}f32({f} %m3v, {f} %gr, {f} %m5v)
  %sc.raw = call {f} @llvm.fma.v{LANES}f32({f} %m4v, {f} %gc, {f} %sc.b)
  %sr.lo = call {f} @llvm.maxnum.v{LANES}f32({f} %sr.raw, {f} {_constant("float", "-1.0")})
  %sr = call {f} @llvm.minnum.v{LANES}f32({f} %sr.lo, {f} %hv)
  %sc.lo = call {f} @llvm.maxnum.v{LANES}f32({f} %sc.raw, {f} {_constant("float", "-1.0")})
  %sc = call {f} @llvm.minnum.v{LANES}f32({f} %sc.lo, {f} %wv)
  %r0f = call {f} @llvm.{rounding}.v{LANES}f32({f} %sr)
  %c0f = call {f} @llvm.{rounding}.v{LANES}f32({f} %sc)
  %cwf = fadd {f} %c0f, %cornerf
  %atf = call {f} @llvm.fma.v{LANES}f32({f} %r0f, {f} %pitchf, {f} %cwf)
  %at = fptosi {f} %atf to {i32}
  %atp = getelementptr i32, ptr %coords, i64 %u
  store {i32} %at, ptr %atp, align 4
"""
    if bilinear:
        text += f"""  %frf = fsub {f} %sr, %r0f
  %fcf = fsub {f} %sc, %c0f
{_widen(t, "%frw", "%frf")}{_widen(t, "%fcw", "%fcf")}  %frp = getelementptr {t}, ptr %fracs, i64 %u
  store {v} %frw, ptr %frp, align {_BYTES[t]}
  %fcp = getelementptr {t}, ptr %fracs.cols, i64 %u
  store {v} %fcw, ptr %fcp, align {_BYTES[t]}
"""
    return text + f"""  %u.next = add i64 %u, {LANES}
  %u.more = icmp ult i64 %u.next, %size
  br i1 %u.more, label %where, label %plane

"""


def _copy(t: str) -> str:
    """Blocks `copy` to `copy.row`: the plane's rows into the scratch plane's interior, LANES
    pixels at a time, the last run of a row a masked load. Its store writes zeros past the row,
    into the border (zero anyway) and the next row's first pixels, which that row's copy writes
    after: so every run is one load and one store, with no scalar tail loop."""
    i32 = _vec("i32")
    return f"""copy:
  %r = phi i64 [ 0, %plane ], [ %r.next, %copy.row ]
  %from.at = mul i64 %r, %w
  %from = getelementptr {t}, ptr %this.from, i64 %from.at
  %to.at = mul i64 %r, %pitch
  %to = getelementptr {t}, ptr %in, i64 %to.at
  br label %copy.run

copy.run:
  %k = phi i64 [ 0, %copy ], [ %k.next, %copy.run ]
  %k32 = trunc i64 %k to i32
{_splat("%kv", "i32", "%k32")}  %kl = add {i32} %kv, {_STEPS}
  %kin = icmp slt {i32} %kl, %wv32
  %fp = getelementptr {t}, ptr %from, i64 %k
{_masked_load("%pixels", t, "%fp", "%kin")}  %tp = getelementptr {t}, ptr %to, i64 %k
  store {_vec(t)} %pixels, ptr %tp, align {_BYTES[t]}
  %k.next = add i64 %k, {LANES}
  %k.more = icmp ult i64 %k.next, %w
  br i1 %k.more, label %copy.run, label %copy.row

copy.row:
  %r.next = add i64 %r, 1
  %r.more = icmp ult i64 %r.next, %h
  br i1 %r.more, label %copy, label %run

"""


def _sample(t: str, bilinear: bool) -> str:
    """%sample: the output pixels %j ..< %j + LANES of the plane, from the scratch plane at the
    coordinates pass's indices (and fractions)."""
    v = _vec(t)
    if not bilinear:
        return _lane_indices() + _singles("%sample", t)
    return f"""{_lane_indices()}  %frp.j = getelementptr {t}, ptr %fracs, i64 %j
  %fr = load {v}, ptr %frp.j, align {_BYTES[t]}
  %fcp.j = getelementptr {t}, ptr %fracs.cols, i64 %j
  %fc = load {v}, ptr %fcp.j, align {_BYTES[t]}
{_pairs("%top", t, "%scratch")}{_pairs("%bot", t, "%below")}  %dt = fsub {v} %top.r, %top.l
  %mt = fmul {v} %dt, %fc
  %upper = fadd {v} %top.l, %mt
  %db = fsub {v} %bot.r, %bot.l
  %mb = fmul {v} %db, %fc
  %lower = fadd {v} %bot.l, %mb
  %dv = fsub {v} %lower, %upper
  %mv = fmul {v} %dv, %fr
  %sample = fadd {v} %upper, %mv
"""


def _noise_added(t: str) -> str:
    """Blocks to `run.noise`: %value = %sample + std * the normals of pixels %j ..< %j + LANES
    (the last run of a plane reads no normals past the image's window: a masked load)."""
    f, i32 = _vec("float"), _vec("i32")
    return f"""  %zp = getelementptr float, ptr %this.bank, i64 %j
  %j.end = add i64 %j, {LANES}
  %whole = icmp ule i64 %j.end, %size
  br i1 %whole, label %run.normals, label %run.last

run.last:
  %j32 = trunc i64 %j to i32
{_splat("%jv", "i32", "%j32")}  %lane = add {i32} %jv, {_STEPS}
  %live = icmp slt {i32} %lane, %sizev
{_masked_load("%z.last", "float", "%zp", "%live")}  br label %run.noise

run.normals:
  %z.whole = load {f}, ptr %zp, align 4
  br label %run.noise

run.noise:
  %z = phi {f} [ %z.whole, %run.normals ], [ %z.last, %run.last ]
  %s = fmul {f} %stdv, %z
{_widen(t, "%sw", "%s")}  %value = fadd {_vec(t)} %sample, %sw
"""


def _prefetch(t: str, noise: bool) -> str:
    """Ask for channel %ch of image %i + AHEAD (its pixels, and its noise) in the L2 cache, at
    the position of run %j of this plane: the samples of a batch lie at random in the training
    set, and a cache line or two per run keep ahead of the copy without crowding out the current
    plane's loads."""
    text = f"""  %ahead.p = getelementptr {t}, ptr %next.from, i64 %j
  call void @llvm.prefetch.p0(ptr %ahead.p, i32 0, i32 2, i32 1)
"""
    if noise:
        text += """  %ahead.z = getelementptr float, ptr %next.bank, i64 %j
  call void @llvm.prefetch.p0(ptr %ahead.z, i32 0, i32 2, i32 1)
"""
    return text


def _resample_ir(t: str, bilinear: bool, noise: bool) -> str:
    """out[i, k] = images[i, k] sampled at maps[i] @ (r, c, 1) for every pixel (r, c), for a batch
    [n, channels, h, w] of element type `t` (row-major): images[i] is src[index[i]]. `maps` is
    [n, 2, 3] float32 (the first two rows of each 3 x 3 matrix); `grid` is [2, stride] float32,
    every pixel's row and column with stride = h * w rounded up to LANES; `scratch` is one plane
    with a zero border ([h + 3, w + 3] and LANES elements more, zeros: the kernel writes only its
    interior and zeros); `coords` holds the coordinates pass's stride int32 indices, then (for
    blending) 2 * stride fractions of type `t`. `dst` holds LANES - 1 elements more than the
    batch: the last run of a plane writes past it, into the next plane (written after) or that
    spare room. With `noise`, out += std * normals[offsets[i] + p] (p the pixel's index within
    image i), as augment.add_noise."""
    name = (f"graphc_resample_{'bilinear' if bilinear else 'nearest'}"
            f"{'_noise' if noise else ''}_{t}")
    value, latch = ("%value", "run.noise") if noise else ("%sample", "run")
    constants = "".join(_splat(name, t, value) for name, t, value in (
        ("%hv", "float", "%hf"), ("%wv", "float", "%wf"), ("%pitchf", "float", "%pitch.f"),
        ("%cornerf", "float", "%corner.f"), ("%stdv", "float", "%std"),
        ("%sizev", "i32", "%size32"), ("%wv32", "i32", "%w32")))
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
                    i64 %n, i64 %channels, i64 %h, i64 %w, ptr noalias nocapture %coords) #0 {{
entry:
  %size = mul i64 %h, %w
  %pitch = add i64 %w, 3
  %corner = add i64 %w, 4
  %w32 = trunc i64 %w to i32
  %size32 = trunc i64 %size to i32
  %below = getelementptr {t}, ptr %scratch, i64 %pitch        ; the row below's first element
  %in = getelementptr {t}, ptr %scratch, i64 %corner        ; pixel (0, 0) of the scratch plane
  %hf = uitofp i64 %h to float
  %wf = uitofp i64 %w to float
  %pitch.f = uitofp i64 %pitch to float
  %corner.f = uitofp i64 %corner to float
  %rounded = add i64 %size, {LANES - 1}
  %stride = and i64 %rounded, {-LANES}
  %grid.cols = getelementptr float, ptr %grid, i64 %stride
  %fracs = getelementptr i32, ptr %coords, i64 %stride
  %fracs.cols = getelementptr {t}, ptr %fracs, i64 %stride
  %last = add i64 %n, -1
{constants}  %empty = icmp eq i64 %n, 0
  %none = icmp eq i64 %size, 0
  %no.channels = icmp eq i64 %channels, 0
  %nothing = or i1 %empty, %none
  %skip = or i1 %nothing, %no.channels
  br i1 %skip, label %done, label %image

image:                                        ; image %i: its map, once for all its channels
  %i = phi i64 [ 0, %entry ], [ %i.next, %image.end ]
  %m = mul i64 %i, 6
{maps}  br label %where

{_coordinates(t, bilinear)}plane:                                        ; channel %ch of image %i
  %ch = phi i64 [ 0, %where ], [ %ch.next, %run.end ]
  %image.first = mul i64 %i, %channels
  %q = add i64 %image.first, %ch
{_plane(t, "this", "%i", "%ch", noise)}  %base = mul i64 %q, %size
  %out = getelementptr {t}, ptr %dst, i64 %base
  %ch.next = add i64 %ch, 1
  %same = icmp ult i64 %ch.next, %channels
  %i.next = add i64 %i, 1
  %i.ahead = add i64 %i, {AHEAD}
  %next.i = call i64 @llvm.umin.i64(i64 %i.ahead, i64 %last)
{_plane(t, "next", "%next.i", "%ch", noise)}  br label %copy

{_copy(t)}run:                                          ; output pixels %j ..< %j + LANES of the plane
  %j = phi i64 [ 0, %copy.row ], [ %j.next, %{latch} ]
{_prefetch(t, noise)}{_sample(t, bilinear)}{_noise_added(t) if noise else ""}\
  %op = getelementptr {t}, ptr %out, i64 %j
  store {_vec(t)} {value}, ptr %op, align {_BYTES[t]}
  %j.next = add i64 %j, {LANES}
  %j.more = icmp ult i64 %j.next, %size
  br i1 %j.more, label %run, label %run.end

run.end:
  br i1 %same, label %plane, label %image.end

image.end:
  %i.more = icmp ult i64 %i.next, %n
  br i1 %i.more, label %image, label %done

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
declare {_vec("double")} @llvm.masked.load.v{LANES}f64.p0(ptr, i32, {_vec("i1")}, {_vec("double")})
declare i64 @llvm.umin.i64(i64, i64)
declare {_vec("float")} @llvm.fma.v{LANES}f32({_vec("float")}, {_vec("float")}, {_vec("float")})
declare void @llvm.prefetch.p0(ptr, i32, i32, i32)

attributes #0 = {{ nounwind }}
"""


def module_text() -> str:
    """The whole module: resampling (nearest and bilinear, with noise or without) and noise, for
    float and double."""
    parts = [_DECLARATIONS]
    for t in IR_TYPES:
        parts += [_resample_ir(t, bilinear, noise)
                  for bilinear in (False, True) for noise in (False, True)]
        parts.append(_noise_ir(t))
    return "".join(parts)
