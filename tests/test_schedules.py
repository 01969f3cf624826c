"""graphc.runtime.schedules: the learning rate of every epoch against PyTorch's documented closed
forms (StepLR, ExponentialLR, CosineAnnealingLR with eta_min=0) and ReduceLROnPlateau's algorithm
(mode min, relative threshold 1e-4, patience, factor, min_lr), plus the JSON state round-trip that a
resumed run relies on."""
from __future__ import annotations

import json
import math

import pytest

from graphc.runtime.schedules import SCHEDULES, Plateau, make_schedule


def lrs(schedule, epochs: int, losses=None) -> list[float]:
    """The lr used in each of `epochs` epochs: read before the epoch, stepped after it."""
    out = []
    for epoch in range(epochs):
        out.append(schedule.lr)
        schedule.epoch_end(None if losses is None else losses[epoch])
    return out


# --- closed forms ------------------------------------------------------------------------------

def test_the_table_holds_every_schedule():
    assert set(SCHEDULES) == {"constant", "step", "exponential", "cosine", "plateau", "warmup_cosine"}


def test_constant():
    s = make_schedule(("constant", {}), 0.3)
    assert lrs(s, 6, [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]) == [0.3] * 6


@pytest.mark.parametrize("every, gamma", [(1, 0.9), (3, 0.1), (2, 0.5), (4, 1.0)])
def test_step_is_torch_steplr(every, gamma):
    base = 0.05
    s = make_schedule(("step", {"every": every, "gamma": gamma}), base)
    # torch.optim.lr_scheduler.StepLR: lr = base_lr * gamma ** (last_epoch // step_size)
    want = [base * gamma ** (epoch // every) for epoch in range(12)]
    assert lrs(s, 12) == pytest.approx(want, rel=1e-12, abs=0)


def test_step_values_spelled_out():
    s = make_schedule(["step", {"every": 2, "gamma": 0.1}], 1.0)     # a list, as read from JSON
    assert lrs(s, 6) == pytest.approx([1.0, 1.0, 0.1, 0.1, 0.01, 0.01], rel=1e-12)


@pytest.mark.parametrize("gamma", [0.95, 0.5, 1.0])
def test_exponential_is_torch_exponentiallr(gamma):
    base = 2e-3
    s = make_schedule(("exponential", {"gamma": gamma}), base)
    # torch.optim.lr_scheduler.ExponentialLR: lr = base_lr * gamma ** last_epoch
    assert lrs(s, 15) == pytest.approx([base * gamma ** e for e in range(15)], rel=1e-12, abs=0)


@pytest.mark.parametrize("t_max", [1, 4, 30])
def test_cosine_is_torch_cosineannealinglr(t_max):
    base = 2e-3
    s = make_schedule(("cosine", {"epochs": t_max}), base)
    # CosineAnnealingLR(T_max, eta_min=0):
    #   lr = eta_min + (base_lr - eta_min) * (1 + cos(pi * last_epoch / T_max)) / 2
    want = [base * (1 + math.cos(math.pi * e / t_max)) / 2 for e in range(t_max + 1)]
    got = lrs(s, t_max + 1)
    assert got == pytest.approx(want, rel=1e-12, abs=1e-18)
    assert got[0] == base and got[-1] == pytest.approx(0.0, abs=1e-18)
    assert all(a >= b for a, b in zip(got, got[1:]))      # monotone down to eta_min


def test_cosine_holds_at_zero_past_its_end():
    # documented deviation from PyTorch (whose closed form rises again after T_max)
    s = make_schedule(("cosine", {"epochs": 3}), 1.0)
    assert lrs(s, 8)[3:] == pytest.approx([0.0] * 5, abs=1e-15)


def test_closed_forms_answer_at_any_epoch():
    s = make_schedule(("step", {"every": 2, "gamma": 0.5}), 1.0)
    assert [s.at(e) for e in (0, 1, 2, 5, 10)] == [1.0, 1.0, 0.5, 0.25, 0.5 ** 5]


# --- ReduceLROnPlateau -------------------------------------------------------------------------

def torch_plateau(base_lr, losses, patience, factor, min_lr=0.0, threshold=1e-4, eps=1e-8):
    """The lr of each epoch by torch.optim.lr_scheduler.ReduceLROnPlateau(mode='min',
    threshold_mode='rel', cooldown=0), transcribed from its documented algorithm."""
    lr, best, bad, out = base_lr, math.inf, 0, []
    for loss in losses:
        out.append(lr)
        if loss < best * (1 - threshold):          # is_better, mode min, rel
            best, bad = loss, 0
        else:
            bad += 1
        if bad > patience:                         # _reduce_lr
            new = max(lr * factor, min_lr)
            if lr - new > eps:
                lr = new
            bad = 0
    out.append(lr)                                 # the lr after the last epoch
    return out


def plateau_lrs(base_lr, losses, **options) -> list[float]:
    s = make_schedule(("plateau", {"patience": 10, "factor": 0.1, "min_lr": 0.0, **options}),
                      base_lr)
    return lrs(s, len(losses), losses) + [s.lr]


def test_plateau_hand_traced():
    # patience 2, factor 0.5: three epochs without improvement reduce the lr; an improvement by
    # less than the relative threshold (0.8 -> 0.79995 is 6e-5 relative) does not count
    losses = [1.0, 0.9, 0.9, 0.9, 0.9, 0.8, 0.79995, 0.79995, 0.79995, 0.5]
    want = [1.0, 1.0, 1.0, 1.0, 1.0, 0.5, 0.5, 0.5, 0.5, 0.25, 0.25]
    assert plateau_lrs(1.0, losses, patience=2, factor=0.5) == pytest.approx(want, rel=1e-12)
    assert torch_plateau(1.0, losses, 2, 0.5) == pytest.approx(want, rel=1e-12)


def test_plateau_improvement_just_above_the_threshold_counts():
    # 1.0 -> 0.9998 is 2e-4 relative: better; 0.9998 -> 0.99975 is 5e-5: not better
    losses = [1.0, 0.9998, 0.99975, 0.99975]
    assert plateau_lrs(1.0, losses, patience=0, factor=0.1) == pytest.approx(
        [1.0, 1.0, 1.0, 0.1, 0.01], rel=1e-12)


def test_plateau_patience_zero_and_min_lr():
    losses = [1.0] * 6
    got = plateau_lrs(1.0, losses, patience=0, factor=0.1, min_lr=0.05)
    assert got == pytest.approx([1.0, 1.0, 0.1, 0.05, 0.05, 0.05, 0.05], rel=1e-12)
    assert min(got) == 0.05


def test_plateau_without_a_validation_loss_keeps_the_lr():
    s = make_schedule(("plateau", {"patience": 0, "factor": 0.1, "min_lr": 0.0}), 1.0)
    assert lrs(s, 5) == [1.0] * 5 and s.epoch == 5


@pytest.mark.parametrize("seed", range(6))
@pytest.mark.parametrize("patience, factor, min_lr", [(0, 0.1, 0.0), (1, 0.5, 1e-3), (3, 0.1, 0.0),
                                                      (2, 0.3, 0.02)])
def test_plateau_matches_torch_on_noisy_losses(seed, patience, factor, min_lr):
    import numpy as np
    rng = np.random.default_rng(seed)
    # a loss that falls, stalls (exactly or within the threshold) and wobbles
    losses = list(1 / (1 + np.arange(40) / 5) + rng.normal(0, 0.02, 40))
    losses[10:16] = [losses[9]] * 6
    losses[20:24] = [losses[19] * (1 - 5e-5)] * 4
    got = plateau_lrs(0.1, losses, patience=patience, factor=factor, min_lr=min_lr)
    want = torch_plateau(0.1, losses, patience, factor, min_lr)   # with PyTorch's eps=1e-8 rule
    assert got == pytest.approx(want, rel=1e-12)


def test_plateau_ignores_reductions_smaller_than_eps_like_torch():
    # patience 0, factor 0.1, a loss that never improves: PyTorch stops at 1e-8 (1e-8 -> 1e-9 is
    # a change of 9e-9 < eps)
    losses = [1.0] * 12
    want = torch_plateau(1.0, losses, 0, 0.1)
    assert min(want) == pytest.approx(1e-8, rel=1e-9)
    assert plateau_lrs(1.0, losses, patience=0, factor=0.1) == pytest.approx(want, rel=1e-9)


# --- state round-trip --------------------------------------------------------------------------

SPECS = [("constant", {}), ("step", {"every": 2, "gamma": 0.5}), ("exponential", {"gamma": 0.9}),
         ("cosine", {"epochs": 7}), ("plateau", {"patience": 1, "factor": 0.5, "min_lr": 1e-4})]
LOSSES = [1.0, 0.8, 0.8, 0.81, 0.7, 0.7, 0.7, 0.7, 0.6, 0.65, 0.65, 0.65]


@pytest.mark.parametrize("spec", SPECS, ids=[s[0] for s in SPECS])
@pytest.mark.parametrize("stop", [0, 1, 3, 6])
def test_state_round_trips_through_json_mid_way(spec, stop):
    straight = make_schedule(spec, 0.1)
    want = lrs(straight, len(LOSSES), LOSSES)

    first = make_schedule(spec, 0.1)
    before = lrs(first, stop, LOSSES)
    text = json.dumps(first.to_json())             # what a checkpoint stores (strict JSON)
    assert "Infinity" not in text and "NaN" not in text
    resumed = make_schedule(json.loads(json.dumps(list(spec))), 0.1)
    resumed.load_json(json.loads(text))
    assert resumed.to_json() == first.to_json()
    after = lrs(resumed, len(LOSSES) - stop, LOSSES[stop:])
    assert before + after == want                  # bit-identical, not approximately


def test_plateau_state_carries_best_and_bad_epochs():
    s = make_schedule(("plateau", {"patience": 2, "factor": 0.5, "min_lr": 0.0}), 1.0)
    for loss in (1.0, 0.5, 0.6, 0.7):
        s.epoch_end(loss)
    state = s.to_json()
    assert state == {"epoch": 4, "lr": 1.0, "best": 0.5, "bad_epochs": 2}
    fresh = Plateau(1.0, patience=2, factor=0.5, min_lr=0.0)
    assert fresh.to_json()["best"] is None          # inf is not JSON
    fresh.load_json(state)
    fresh.epoch_end(0.7)                            # a third bad epoch: reduce now, not later
    assert fresh.lr == 0.5
