"""Data augmentation (runtime/augment.py and the train block's `augment`): each op on hand-made
images, randomness from (seed, epoch, position) counters, training batches only (labels unchanged,
evaluation never augmented), bit-identical resume, the checks of the setting with their
locations, and `graphc train` on the digits with augmentation."""
from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from conftest import REPO

import graphc
from graphc.cli import main
from graphc.compiler import check_source
from graphc.errors import GraphcError
from graphc.frontend import train_spec
from graphc.images import image_shape
from graphc.runtime import augment
from graphc.runtime.augment import (
    CHUNK,
    Augmenter,
    crop_maps,
    flip_maps,
    prefetch,
    resample,
    rotation_maps,
    shift_maps,
    then,
)
from graphc.runtime.data import Scaler, batches
from graphc.runtime.program import Loss, Program
from graphc.runtime.train import Data, Trainer, TrainSettings, prepare_data

MODEL = """\
model m {
    input x: f32[N, 64]
    input y: i64[N]
    logits = x -> linear(16) -> relu -> linear(10)
    output logits
    loss = cross_entropy(logits, y)
}
train m {
    optimizer = adam(lr=3e-3)
    augment   = AUGMENT
    epochs    = 3
    seed      = 4
}
"""
SOME = "[shift(1), rotate(10), flip(horizontal), noise(0.05), crop(8, pad=1)]"


def model_text(augment: str = SOME) -> str:
    return MODEL.replace("AUGMENT", augment)


def numbered(h: int, w: int, n: int = 1) -> np.ndarray:
    """n images [n, 1, h, w] whose pixels are 1, 2, 3, ... (no zero, so zero fill shows)."""
    return np.arange(1, n * h * w + 1, dtype=np.float32).reshape(n, 1, h, w)


# --- each op on hand-made images ----------------------------------------------------------------

def test_shift_moves_pixels_and_fills_with_zeros():
    x = numbered(4, 5, n=2)
    out = resample(x, shift_maps(np.array([1, -2]), np.array([2, 0])), exact=True)
    expected = np.zeros_like(x)
    expected[0, 0, 1:, 2:] = x[0, 0, :-1, :-2]         # 1 down, 2 right
    expected[1, 0, :-2, :] = x[1, 0, 2:, :]            # 2 up
    np.testing.assert_array_equal(out, expected)


def test_flip_mirrors_only_the_chosen_images():
    x = numbered(3, 4, n=2)
    horizontal = resample(x, flip_maps(np.array([True, False]), axis=1, size=4), exact=True)
    np.testing.assert_array_equal(horizontal[0], x[0, :, :, ::-1])
    np.testing.assert_array_equal(horizontal[1], x[1])
    vertical = resample(x, flip_maps(np.array([True, True]), axis=0, size=3), exact=True)
    np.testing.assert_array_equal(vertical, x[:, :, ::-1, :])


def test_crop_takes_a_window_of_the_padded_image():
    x = numbered(4, 4, n=2)
    padded = np.pad(x, ((0, 0), (0, 0), (2, 2), (2, 2)))
    out = resample(x, crop_maps(np.array([0, 3]), np.array([4, 1]), (4, 4), 2, 4, 4), exact=True)
    np.testing.assert_array_equal(out[0], padded[0, :, 0:4, 4:8])
    np.testing.assert_array_equal(out[1], padded[1, :, 3:7, 1:5])


def test_a_smaller_crop_is_stretched_to_the_image_size():
    x = np.ones((1, 1, 6, 6), np.float32)
    x[0, 0, :3, :3] = 5.0                      # the top-left quarter
    out = resample(x, crop_maps(np.array([0]), np.array([0]), (3, 3), 0, 6, 6), exact=False)
    assert out.shape == x.shape
    # the 3 x 3 window holds only fives, and reads no zeros from beyond the image
    np.testing.assert_allclose(out[0, 0, :5, :5], 5.0)


def test_rotate_by_90_degrees_turns_a_known_pattern_counterclockwise():
    x = np.zeros((1, 1, 5, 5), np.float32)
    x[0, 0, 0, 2] = 1.0                        # top middle
    x[0, 0, 1, 4] = 2.0                        # right edge, upper
    out = resample(x, rotation_maps(np.array([90.0]), 5, 5), exact=False)
    expected = np.rot90(x, k=1, axes=(2, 3))   # numpy's rot90 turns counterclockwise
    np.testing.assert_allclose(out, expected, atol=1e-5)
    assert out[0, 0, 2, 0] == pytest.approx(1.0)         # now left middle


def test_small_rotations_keep_the_centre_and_blend_bilinearly():
    x = numbered(7, 7)
    out = resample(x, rotation_maps(np.array([-8.0, 8.0]), 7, 7)[:1], exact=False)
    assert out[0, 0, 3, 3] == pytest.approx(x[0, 0, 3, 3])
    assert not np.array_equal(out, x)
    assert out.min() >= 0 and out.max() <= x.max()      # a convex blend, zeros outside


def test_noise_has_the_requested_spread_and_no_bias():
    x = np.zeros((256, 784), np.float32)
    out = Augmenter([("noise", {"std": 0.5})], (1, 28, 28), seed=0)(x, 0, 0)
    assert out.dtype == np.float32
    assert abs(out.mean()) < 0.01 and out.std() == pytest.approx(0.5, rel=0.01)


def test_composed_geometric_ops_match_applying_them_one_by_one():
    """shift then flip sample once through the product of their maps: the same pixels as doing
    them in order, where no pixel leaves the image in between."""
    x = np.zeros((1, 1, 6, 6), np.float32)
    x[0, 0, 2:4, 1:3] = [[1, 2], [3, 4]]
    shift, flip = shift_maps(np.array([1]), np.array([1])), flip_maps(np.array([True]), 1, 6)
    one_by_one = resample(resample(x, shift, True), flip, True)
    np.testing.assert_array_equal(resample(x, shift @ flip, True), one_by_one)


# --- the native kernels against the numpy reference --------------------------------------------

def _random_maps(rng, n: int, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """(exact maps: shifts, flips and crops; blending maps: rotations and stretching crops)."""
    exact = (shift_maps(rng.integers(-3, 4, n), rng.integers(-3, 4, n))
             @ flip_maps(rng.random(n) < 0.5, 1, w) @ flip_maps(rng.random(n) < 0.5, 0, h)
             @ crop_maps(rng.integers(0, 5, n), rng.integers(0, 5, n), (h, w), 2, h, w))
    blend = (rotation_maps(rng.uniform(-180, 180, n), h, w)
             @ crop_maps(rng.integers(0, 3, n), rng.integers(0, 3, n), (h - 2, w - 3), 1, h, w))
    return exact, blend


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(64, 1, 28, 28), (5, 3, 9, 7), (1, 2, 1, 6), (4, 2, 5, 17),
                                   (3, 1, 6, 16)])
def test_native_resampling_matches_the_numpy_reference(dtype, shape):
    """Same pixels for copies; blends within float32 rounding of the coordinates (numpy's
    product of the maps and the pixel grid is a BLAS call, the kernel's a multiply-add). Rows
    of any width: the kernel copies them eight pixels at a time, writing zeros past the row."""
    native = augment.native_kernels()
    rng = np.random.default_rng(sum(shape))
    x = rng.standard_normal(shape).astype(dtype)
    exact, blend = _random_maps(rng, shape[0], *shape[2:])
    out = native.resample(x, exact, True)
    assert out.dtype == dtype and out.shape == shape
    np.testing.assert_array_equal(out, resample(x, exact, True))
    np.testing.assert_array_equal(native.resample(x, blend, True), resample(x, blend, True))
    np.testing.assert_allclose(native.resample(x, blend, False), resample(x, blend, False),
                               atol=2e-5 * np.abs(x).max())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(64, 1, 28, 28), (5, 3, 9, 7), (3, 2, 1, 1), (4, 3, 8, 8)])
def test_native_resampling_adds_noise_and_gathers_in_the_same_pass(dtype, shape):
    """resample(..., noise, index): the reference's resample of images[index], then add_noise,
    on planes whose size is no multiple of the kernel's 8 lanes and images of several channels
    (each reads its own part of the image's noise window)."""
    native = augment.native_kernels()
    rng = np.random.default_rng(sum(shape) + 1)
    n, size = shape[0], int(np.prod(shape[1:]))
    x = rng.standard_normal((2 * n + 1, *shape[1:])).astype(dtype)
    index = rng.permutation(len(x))[:n]
    normals = rng.standard_normal(3 * size + 40, np.float32)
    offsets = rng.integers(0, len(normals) - size + 1, n)
    offsets[-1] = len(normals) - size                    # the window that ends the bank
    noise = (normals, offsets, 0.25)
    exact, blend = _random_maps(rng, n, *shape[2:])
    copied = native.resample(x, exact, True, noise, index)
    np.testing.assert_array_equal(copied, augment.add_noise(resample(x[index], exact, True),
                                                            *noise))
    np.testing.assert_array_equal(copied, resample(x, exact, True, noise, index))
    blended = native.resample(x, blend, False, noise, index)
    assert blended.dtype == dtype and blended.shape == shape
    np.testing.assert_allclose(blended, resample(x, blend, False, noise, index),
                               atol=2e-5 * np.abs(x).max())
    # images that are not contiguous are gathered first; the result is the same
    strided = np.repeat(x, 2, axis=0)[::2]
    np.testing.assert_array_equal(native.resample(strided, exact, True, noise, index), copied)


@pytest.mark.parametrize("width", [5, 8, 13])
def test_native_resampling_keeps_its_scratch_border_zero(width):
    """The kernels reuse one zero-bordered scratch plane from call to call and write only its
    interior (and zeros): after images of sevens, an image of zeros still resamples to zeros,
    also where the maps read the border."""
    native = augment.native_kernels()
    rng = np.random.default_rng(width)
    for exact, blend in [_random_maps(rng, 6, 7, width)] * 2:
        for maps, nearest in ((exact, True), (blend, False), (blend, True)):
            sevens = np.full((6, 2, 7, width), 7.0, np.float32)
            assert native.resample(sevens, maps, nearest).max() == 7.0
            zeros = native.resample(np.zeros_like(sevens), maps, nearest)
            np.testing.assert_array_equal(zeros, 0.0)


def test_composing_maps_is_their_matrix_product():
    rng = np.random.default_rng(3)
    first, second = _random_maps(rng, 50, 9, 7)
    np.testing.assert_allclose(then(first, second), first @ second, rtol=1e-12, atol=1e-12)


def test_a_chunks_maps_are_the_product_of_each_augmentations_maps():
    """The maps the Augmenter draws for a chunk of positions: each geometric augmentation's maps
    from the chunk's generator, in order, composed in float64 and rounded to float32 once."""
    ops = [("shift", {"pixels": 2}), ("rotate", {"degrees": 10.0}), ("flip",
           {"direction": "vertical", "p": 0.5}), ("noise", {"std": 0.1})]
    drawn = Augmenter(ops, (1, 9, 7), seed=6)._draw_chunk(2, 3)
    rng = np.random.default_rng([6, 2, 3, augment._STREAM])
    maps = then(then(shift_maps(rng.integers(-2, 3, CHUNK), rng.integers(-2, 3, CHUNK)),
                     rotation_maps(rng.uniform(-10, 10, CHUNK), 9, 7)),
                flip_maps(rng.random(CHUNK) < 0.5, 0, 9))
    np.testing.assert_array_equal(drawn[0], maps[:, :2].astype(np.float32))
    np.testing.assert_array_equal(drawn[1], rng.integers(0, augment.NORMALS - 63 + 1, CHUNK))


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_native_noise_is_the_reference_bit_for_bit(dtype):
    native = augment.native_kernels()
    rng = np.random.default_rng(1)
    x, normals = rng.random((9, 2, 5, 5)).astype(dtype), rng.standard_normal(500, np.float32)
    offsets = rng.integers(0, 500 - 50 + 1, 9)
    offsets[0], offsets[-1] = 0, 450                     # both ends of the bank
    out = native.add_noise(x, normals, offsets, 0.3)
    assert out.dtype == dtype and out is not x
    np.testing.assert_array_equal(out, augment.add_noise(x, normals, offsets, 0.3))


@pytest.mark.parametrize("ops", [
    [("noise", {"std": 0.1}), ("shift", {"pixels": 1}), ("flip", {"direction": "horizontal",
                                                                  "p": 0.5})],
    [("shift", {"pixels": 1}), ("noise", {"std": 0.1}), ("crop", {"size": 8, "pad": 2})]])
def test_the_augmenter_runs_natively_and_agrees_with_numpy(ops):
    x = np.random.default_rng(2).random((32, 64), dtype=np.float32)
    native, reference = Augmenter(ops, (1, 8, 8), 5), Augmenter(ops, (1, 8, 8), 5, augment.NUMPY)
    assert native.kernels is not augment.NUMPY
    np.testing.assert_array_equal(native(x, 2, 7), reference(x, 2, 7))
    index = np.array([31, 0, 5, 5, 17])
    np.testing.assert_array_equal(native(x, 2, 7, index=index), reference(x[index], 2, 7))


def test_images_the_kernels_do_not_take_are_augmented_by_numpy():
    """The native kernels take float32 and float64 planes of fewer than 2**24 elements with their
    border; the Augmenter gives anything else to numpy."""
    def refuse(*args):
        raise AssertionError("these kernels should not have been called")
    x = np.random.default_rng(0).random((4, 64), dtype=np.float32)
    ops = [("rotate", {"degrees": 10.0}), ("noise", {"std": 0.1})]
    small = augment.Kernels(refuse, refuse, (np.dtype(np.float32),), pixels=11 * 11)
    assert not small.take(x.reshape(4, 1, 8, 8))
    assert small.take(x.reshape(4, 1, 8, 8)[:, :, :7])
    np.testing.assert_array_equal(Augmenter(ops, (1, 8, 8), 1, small)(x, 0, 0),
                                  Augmenter(ops, (1, 8, 8), 1, augment.NUMPY)(x, 0, 0))
    native = augment.native_kernels()

    def images(*shape, dtype=np.float32):                # (a view: nothing allocated)
        return np.broadcast_to(np.zeros((), dtype), shape)
    assert native.pixels == 2**24 and native.take(images(1, 3, 4093, 4092))
    assert not native.take(images(1, 1, 4093, 4093))
    assert not native.take(images(1, 1, 8, 8, dtype=np.float16))


def test_image_shapes_are_inferred_from_the_input():
    assert image_shape(("N", 784)) == (1, 28, 28)
    assert image_shape(("N", 64)) == (1, 8, 8)
    assert image_shape(("N", 3, 32, 30)) == (3, 32, 30)
    for bad in (("N", 60), ("N", 2, 3, 4, 5), ("N", "D")):
        with pytest.raises(ValueError):
            image_shape(bad)


# --- randomness from counters -------------------------------------------------------------------

def test_augmenting_is_a_pure_function_of_seed_epoch_and_position():
    x = np.random.default_rng(0).random((16, 64), dtype=np.float32)
    ops = [("shift", {"pixels": 2}), ("rotate", {"degrees": 10.0}), ("noise", {"std": 0.1})]
    a, b = Augmenter(ops, (1, 8, 8), seed=3), Augmenter(ops, (1, 8, 8), seed=3)
    later = a(x, 1, 5)
    assert np.array_equal(a(x, 0, 2), b(x, 0, 2)) and np.array_equal(later, a(x, 1, 5))
    others = [a(x, 0, 3), a(x, 1, 2), Augmenter(ops, (1, 8, 8), seed=4)(x, 0, 2)]
    assert all(not np.array_equal(a(x, 0, 2), o) for o in others)
    assert later.shape == x.shape and later.dtype == x.dtype


@pytest.mark.parametrize("start", [0, 40, CHUNK - 5])
def test_a_sample_is_augmented_the_same_whatever_the_batches(start):
    """Position p's random choices do not depend on the batch it is in, also where a batch
    spans two chunks of draws."""
    x = np.random.default_rng(1).random((16, 64), dtype=np.float32)
    ops = [("rotate", {"degrees": 30.0}), ("noise", {"std": 0.1}), ("flip",
           {"direction": "vertical", "p": 0.5})]
    a = Augmenter(ops, (1, 8, 8), seed=2)
    whole = a(x, 4, start)
    pieces = [a(x[:3], 4, start), a(x[3:11], 4, start + 3), a(x[11:], 4, start + 11)]
    np.testing.assert_array_equal(np.concatenate(pieces), whole)
    assert not np.array_equal(whole[:8], whole[8:])


def test_chunks_drawn_in_groups_are_the_chunks_drawn_one_by_one():
    """Chunks are drawn augment.GROUP at a time, each from its own generator: the choices for
    any run of positions are those of the chunks drawn singly, whatever was drawn before."""
    ops = [("rotate", {"degrees": 30.0}), ("noise", {"std": 0.1})]
    a = Augmenter(ops, (1, 8, 8), seed=2)
    single = [a._draw_chunk(1, k) for k in range(3 * augment.GROUP)]
    for start, count in [(5, 3), (CHUNK - 3, 700), (7 * CHUNK + 1, 4 * CHUNK), (0, 1)]:
        drawn = a.draws(1, start, count)
        for stage in range(2):
            whole = np.concatenate([chunk[stage] for chunk in single])
            np.testing.assert_array_equal(drawn[stage], whole[start:start + count])


def test_augmenting_ahead_in_a_thread_needs_cores_to_spare(monkeypatch):
    monkeypatch.setattr(augment, "AHEAD", None)
    monkeypatch.setattr(augment, "usable_cores", lambda: 2)
    assert not augment.ahead()
    monkeypatch.setattr(augment, "usable_cores", lambda: 4)
    assert augment.ahead()
    monkeypatch.setattr(augment, "AHEAD", False)
    assert not augment.ahead()


def test_prefetch_yields_in_order_and_passes_errors_on():
    assert list(prefetch(lambda k: k * k, 5)) == [0, 1, 4, 9, 16]
    assert list(prefetch(lambda k: k, 0)) == []

    def fails(k):
        if k == 2:
            raise RuntimeError("batch 2")
        return k
    with pytest.raises(RuntimeError, match="batch 2"):
        list(prefetch(fails, 4))


def test_front_end_and_runtime_know_the_same_augmentations():
    assert list(train_spec.AUGMENTATIONS) == list(augment.AUGMENTATIONS)


# --- in the training loop -----------------------------------------------------------------------

@pytest.fixture(scope="module")
def trained() -> tuple[Program, object]:
    program = graphc.compile_source(model_text())
    settings = TrainSettings.of(program)
    return program, settings


def test_only_training_batches_are_augmented_and_labels_are_unchanged(trained, monkeypatch):
    program, settings = trained
    settings = replace(settings, epochs=1)
    data = prepare_data(program, settings)
    x, y = data.splits["train"]
    fed, evaluated = [], []
    step, evaluate = program.queue_train_step, program.evaluate
    monkeypatch.setattr(program, "queue_train_step", lambda **b: fed.append(b) or step(**b))
    monkeypatch.setattr(program, "evaluate", lambda **b: evaluated.append(b) or evaluate(**b))
    Trainer(program, settings, data).fit()

    assert len(fed) == -(-len(y) // settings.batch)
    for index, batch in zip(batches(len(y), settings.batch, settings.seed, 0), fed):
        np.testing.assert_array_equal(batch["y"], y[index])          # labels as they were
        assert batch["x"].shape == x[index].shape and not np.array_equal(batch["x"], x[index])
    # Evaluation reads the data itself, in batches: each split is a run of consecutive batches.
    seen_x = np.concatenate([b["x"] for b in evaluated])
    seen_y = np.concatenate([b["y"] for b in evaluated])
    for split in ("val", "test"):
        xs, ys = data.splits[split]
        starts = [i for i in range(len(seen_y) - len(ys) + 1)
                  if np.array_equal(seen_x[i:i + len(xs)], xs)]
        assert starts and np.array_equal(seen_y[starts[0]:starts[0] + len(ys)], ys), split


@pytest.mark.parametrize("ahead", [False, True])
def test_the_train_loop_augments_each_batch_at_its_positions(trained, monkeypatch, ahead):
    """Blocks of batches augmented at once, inline or a block ahead in a thread, give each batch
    what augmenting it alone at its place in the epoch gives."""
    program, settings = trained
    settings = replace(settings, epochs=1, batch=7)
    data = prepare_data(program, settings)
    x, y = data.splits["train"]
    fed = []
    monkeypatch.setattr(augment, "AHEAD", ahead)
    monkeypatch.setattr(program, "queue_train_step", lambda **b: fed.append(b) or Loss(1.0))
    trainer = Trainer(program, settings, data)
    trainer.train_epoch(x, y)
    order = batches(len(y), settings.batch, settings.seed, 0)
    assert len(order) % augment.BLOCK and len(fed) == len(order) > augment.BLOCK
    for k, (index, batch) in enumerate(zip(order, fed)):
        np.testing.assert_array_equal(batch["x"], trainer.augmenter(x[index], 0, 7 * k))
        np.testing.assert_array_equal(batch["y"], y[index])


def test_a_model_without_image_inputs_is_refused_at_training():
    program = graphc.compile_source(model_text("[]").replace("f32[N, 64]", "f32[N, 60]"))
    settings = replace(TrainSettings.of(program), augment=(("shift", {"pixels": 1}),))
    with pytest.raises(GraphcError, match=r"model m: augment needs image inputs"):
        Trainer(program, settings, Data({}, Scaler("none"), "x", "y", "generated"))


# --- the setting's checks ------------------------------------------------------------------------

def errors_of(text: str, with_model: bool = False) -> list[str]:
    """Each diagnostic as 'line:col: message | hint'."""
    try:
        checked = check_source(text, "aug.nn")
        if with_model:
            train_spec.check_train(checked.module.trains[0], checked.src, checked.models["m"])
    except GraphcError as err:
        return [f"{d.loc.line}:{d.loc.col}: {d.message} | {d.hint}" for d in err.diagnostics]
    return []


def test_mistakes_in_augment_are_reported_each_at_its_place():
    text = model_text("[shfit(1), rotate(-3), flip(diagonal), noise(std=-1), crop(0), 3, "
                      "shift(1, 2)]")
    assert errors_of(text) == [
        "10:18: unknown augmentation 'shfit' | did you mean 'shift'? "
        "(augmentations: shift, rotate, flip, noise, crop)",
        "10:35: rotate: degrees must be in [0, 180], got -3 | None",
        "10:45: flip: direction: unknown value 'diagonal' | choose horizontal, vertical",
        "10:66: noise: std must be >= 0, got -1 | None",
        "10:76: crop: size must be >= 1, got 0 | None",
        "10:80: augment must be a list of augmentations | "
        "for example augment = [shift(2), rotate(10), noise(0.1)]",
        "10:83: shift takes at most 1 positional argument, got 2 | None",
    ]
    assert errors_of(model_text("[blur(2)]")) == [
        "10:18: unknown augmentation 'blur' | augmentations: shift, rotate, flip, noise, crop"]


def test_augment_is_checked_against_the_model_input():
    assert errors_of(model_text(SOME), with_model=True) == []
    assert errors_of(model_text("[shift(8), crop(11, pad=1)]"), with_model=True) == [
        "10:24: shift(8) would move 8 x 8 images out of sight; shift by less than 8 | "
        "x holds 1 x 8 x 8 images (channels x height x width)",
        "10:33: crop(11, pad=1): the window is larger than the padded image (10 x 10) | "
        "x holds 1 x 8 x 8 images (channels x height x width)"]
    flat = model_text("[shift(1)]").replace("f32[N, 64]", "f32[N, 60]")
    assert errors_of(flat, with_model=True) == [
        "10:17: augment needs image inputs: [N, C, H, W], [N, H, W], or [N, D] with D a square "
        "(one channel of sqrt(D) x sqrt(D), like MNIST's 784 = 28 x 28); x is f32[N, 60] | None"]


def test_the_resolved_block_lists_the_augmentations():
    checked = check_source(model_text("[shift(2), flip(vertical, p=0.25)]"))
    assert checked.trains["m"].augment == (
        ("shift", {"pixels": 2}), ("flip", {"direction": "vertical", "p": 0.25}))
    assert check_source(model_text("[]")).trains["m"].augment == ()


# --- graphc train, interrupted and resumed --------------------------------------------------------

def cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


def params_of(run) -> dict[str, np.ndarray]:
    with np.load(run / "trained" / "params.npz", allow_pickle=False) as npz:
        return {k: npz[k] for k in npz.files}


def test_graphc_train_with_augment_resumes_bit_identically(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(REPO)
    source = tmp_path / "aug.nn"
    source.write_text(model_text())
    whole, broken = tmp_path / "whole", tmp_path / "broken"
    code, out, err = cli(capsys, "train", source, "--out", whole, "--quiet")
    assert code == 0, err
    config = json.loads((whole / "config.json").read_text())
    assert config["settings"]["augment"][0] == ["shift", {"pixels": 1}]

    step = Program.queue_train_step
    stop_at = 34 + 10                               # 34 steps an epoch: inside epoch 2

    def interrupted(self, **batch):
        if self.step == stop_at:
            raise KeyboardInterrupt
        return step(self, **batch)
    monkeypatch.setattr(Program, "queue_train_step", interrupted)
    assert cli(capsys, "train", source, "--out", broken, "--quiet")[0] == 130
    monkeypatch.setattr(Program, "queue_train_step", step)
    code, out2, err = cli(capsys, "train", "--resume", broken, "--quiet")
    assert code == 0, err
    assert out2 == out
    a, b = params_of(whole), params_of(broken)
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
