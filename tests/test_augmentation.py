"""Training augmentation: turning windows as a device worn turned would read them."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shared.errors import ModelError
from trainer_service.training import TrainConfig, spin

windows_seeds = st.integers(min_value=0, max_value=2**32 - 1)


def _windows(seed: int, n: int = 16) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.normal(0.0, 2.0, (n, 20, 3))
    x += rng.normal(0.0, 6.0, (n, 1, 3))  # each window's own gravity
    return x.astype(np.float32)


@settings(max_examples=50, deadline=None)
@given(windows_seeds)
def test_a_turn_about_gravity_keeps_each_windows_posture_and_every_samples_size(seed: int) -> None:
    x = _windows(seed)
    turned = spin(x, np.random.default_rng(seed), share=1.0)
    np.testing.assert_allclose(turned.mean(axis=1), x.mean(axis=1), atol=1e-3)
    np.testing.assert_allclose(np.linalg.norm(turned, axis=2), np.linalg.norm(x, axis=2), rtol=1e-4)
    assert not np.allclose(turned, x, atol=1e-2)  # the movement itself turned


@settings(max_examples=50, deadline=None)
@given(windows_seeds)
def test_a_turn_about_x_keeps_x_and_turns_y_and_z_together(seed: int) -> None:
    x = _windows(seed)
    turned = spin(x, np.random.default_rng(seed), share=1.0, about="x")
    np.testing.assert_allclose(turned[..., 0], x[..., 0], atol=1e-4)
    np.testing.assert_allclose(
        np.hypot(turned[..., 1], turned[..., 2]),
        np.hypot(x[..., 1], x[..., 2]),
        rtol=1e-4,
        atol=1e-4,
    )


def test_share_says_how_many_windows_are_turned() -> None:
    x = _windows(1, n=2000)
    unchanged = np.all(np.isclose(spin(x, np.random.default_rng(0), share=0.0), x), axis=(1, 2))
    assert unchanged.all()
    turned = ~np.all(np.isclose(spin(x, np.random.default_rng(0), share=0.5), x), axis=(1, 2))
    assert 0.45 < turned.mean() < 0.55


def test_an_unknown_rotation_is_refused() -> None:
    with pytest.raises(ModelError, match="rotation"):
        TrainConfig(rotation="anywhere")
    with pytest.raises(ModelError, match="spin_share"):
        TrainConfig(spin_share=1.5)
