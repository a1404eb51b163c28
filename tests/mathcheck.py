"""Shared assertion for the math tests."""

from __future__ import annotations

import torch


def assert_close(actual, expected, rtol=None, atol=None):
    """Like ``torch.testing.assert_close``, minus its one-off ~1 s import of torch.distributed."""
    actual = torch.as_tensor(actual)
    expected = torch.as_tensor(expected, dtype=actual.dtype, device=actual.device)
    assert actual.shape == expected.shape, f"shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    double = actual.dtype == torch.float64
    rtol = (1e-7 if double else 1.3e-6) if rtol is None else rtol
    atol = (1e-7 if double else 1e-5) if atol is None else atol
    diff = (actual - expected).abs().max().item() if actual.numel() else 0.0
    assert torch.allclose(actual, expected, rtol=rtol, atol=atol), (
        f"max abs diff {diff:.3g} (rtol={rtol}, atol={atol})"
    )
