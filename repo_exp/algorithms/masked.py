"""Masked reductions over response tokens.

Two aggregations are offered because the published trainers differ:
- ``seq_mean_token_mean`` (Safe RLHF's ``masked_mean``): average over each sequence's tokens, then over sequences,
  so every response weighs the same whatever its length;
- ``token_mean``: one average over every response token of the batch.
"""

from __future__ import annotations

import torch

AGGREGATIONS = ("seq_mean_token_mean", "token_mean")


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x`` where ``mask`` is 1. ``x``, ``mask``: same shape."""
    x = x * mask
    return x.sum() if dim is None else x.sum(dim=dim)


def masked_mean(x: torch.Tensor, mask: torch.Tensor, aggregation: str = "token_mean") -> torch.Tensor:
    """Mean of ``x`` (B, T) over the positions where ``mask`` (B, T) is 1.

    ``seq_mean_token_mean`` averages each row over its own tokens first; rows with no token count as 0 and are
    excluded from the row average. ``token_mean`` is one ratio over the whole batch.
    """
    mask = mask.to(x.dtype)
    if aggregation == "token_mean":
        return masked_sum(x, mask) / mask.sum().clamp(min=1.0)
    if aggregation == "seq_mean_token_mean":
        tokens = mask.sum(dim=-1)
        row_means = masked_sum(x, mask, dim=-1) / tokens.clamp(min=1.0)
        rows = (tokens > 0).to(x.dtype)
        return (row_means * rows).sum() / rows.sum().clamp(min=1.0)
    raise ValueError(f"loss aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True) -> torch.Tensor:
    """Variance of the masked entries of ``x``."""
    mask = mask.to(x.dtype)
    count = mask.sum()
    mean = masked_sum(x, mask) / count.clamp(min=1.0)
    var = masked_sum((x - mean) ** 2, mask) / count.clamp(min=1.0)
    if unbiased and count > 1:
        var = var * count / (count - 1)
    return var


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Normalise the masked entries of ``x`` to unit variance (and zero mean when ``shift_mean``)."""
    mask_f = mask.to(x.dtype)
    mean = masked_sum(x, mask_f) / mask_f.sum().clamp(min=1.0)
    var = masked_var(x, mask_f)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask_f
