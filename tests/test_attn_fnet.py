"""FNet mixes over both the sequence and the hidden axis: Re(FFT_seq(FFT_hidden(x)))."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from conftest import TINY_TRANSFORMER, assert_tiny_params, make_attention


def test_fourier_mixing_is_the_2d_transform_over_sequence_and_hidden():
    b, length, h, d = 2, 24, 2, 4
    x = np.random.default_rng(0).standard_normal((b, length, h, d)).astype(np.float32)
    mask = np.arange(length)[None] < np.array([[length], [17]])
    module = make_attention("fnet", length, heads=h, head_dim=d)
    got = np.asarray(module(*(jnp.asarray(x),) * 3, jnp.asarray(mask))).reshape(b, length, h * d)
    x_BxLxE = np.where(mask[:, :, None], x.reshape(b, length, h * d), 0.0).astype(np.float64)
    # Written as two 1-D transforms, hidden first (the paper's order; they commute).
    want = np.fft.fft(np.fft.fft(x_BxLxE, axis=2), axis=1).real
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    sequence_only = np.fft.fft(x_BxLxE, axis=1).real  # a planted bug this test must reject
    assert np.abs(sequence_only - want).max() > 1.0


def test_tiny_param_count_is_pinned():
    # no q, k, v or output projections
    assert_tiny_params("fnet", TINY_TRANSFORMER - 4 * (32 * 32 + 32))
