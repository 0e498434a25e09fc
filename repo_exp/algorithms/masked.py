"""Masked reductions over response tokens.

Two aggregations are offered because the published trainers differ:
- ``seq_mean_token_mean`` (Safe RLHF's ``masked_mean``): average over each sequence's tokens, then over sequences,
  so every response weighs the same whatever its length;
- ``token_mean``: one average over every response token of the batch.

A batch split into parts (micro-batches, data-parallel ranks) gets the batch's mean from its parts only if each part
divides by the *batch's* count (``masked_mean(..., count=…)``, the count from ``aggregation_count`` summed over the
parts): a part's own mean weighs its tokens by the part's size, which differs between ranks holding responses of
different lengths. The same holds for whitening: ``masked_whiten`` takes a ``reduce`` that sums its statistics over
the parts, so that every part centres and scales with the whole batch's mean and variance.
"""

from __future__ import annotations

from typing import Callable

import torch

AGGREGATIONS = ("seq_mean_token_mean", "token_mean")


def masked_sum(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Sum of ``x`` where ``mask`` is 1. ``x``, ``mask``: same shape."""
    x = x * mask
    return x.sum() if dim is None else x.sum(dim=dim)


def _check(aggregation: str) -> None:
    if aggregation not in AGGREGATIONS:
        raise ValueError(f"loss aggregation must be one of {AGGREGATIONS}, got {aggregation!r}")


def aggregation_count(mask: torch.Tensor, aggregation: str) -> torch.Tensor:
    """What ``aggregation`` divides by over ``mask`` (B, T): its tokens (``token_mean``) or its rows that hold a token
    (``seq_mean_token_mean``). A scalar; summed over the parts of a batch it is the batch's count."""
    _check(aggregation)
    mask = mask.float()
    return mask.sum() if aggregation == "token_mean" else (mask.sum(dim=-1) > 0).float().sum()


def masked_mean(x: torch.Tensor, mask: torch.Tensor, aggregation: str = "token_mean",
                count: torch.Tensor | float | None = None) -> torch.Tensor:
    """Mean of ``x`` (B, T) over the positions where ``mask`` (B, T) is 1.

    ``seq_mean_token_mean`` averages each row over its own tokens first; rows with no token count as 0 and are
    excluded from the row average. ``token_mean`` is one ratio over the whole batch.

    ``count``: the ``aggregation_count`` of the whole batch ``x`` is a part of (default: ``x``'s own). The result is
    then this part's share of the batch's mean, and the shares of all parts add up to it.
    """
    _check(aggregation)
    mask = mask.to(x.dtype)
    if aggregation == "token_mean":
        total = masked_sum(x, mask)
    else:
        tokens = mask.sum(dim=-1)
        total = ((masked_sum(x, mask, dim=-1) / tokens.clamp(min=1.0)) * (tokens > 0).to(x.dtype)).sum()
    if count is None:
        count = aggregation_count(mask, aggregation)
    return total / torch.as_tensor(count, dtype=x.dtype, device=x.device).clamp(min=1.0)


def masked_var(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True,
               reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Variance of the masked entries of ``x``; with ``reduce`` (a sum over the parts of a batch, e.g. over
    data-parallel ranks), of the masked entries of every part together."""
    return masked_moments(x, mask, unbiased, reduce)[1]


def masked_moments(x: torch.Tensor, mask: torch.Tensor, unbiased: bool = True,
                   reduce: Callable[[torch.Tensor], torch.Tensor] | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean, variance and count of the masked entries of ``x`` (scalars), in two passes (mean, then squared
    deviations) as one process would compute them. ``reduce`` sums a tensor over the parts of the batch (identity by
    default)."""
    reduce = reduce or (lambda t: t)
    mask = mask.to(x.dtype)
    first = reduce(torch.stack([masked_sum(x, mask), mask.sum()]))
    total, count = first[0], first[1]
    mean = total / count.clamp(min=1.0)
    var = reduce(masked_sum((x - mean) ** 2, mask).reshape(1))[0] / count.clamp(min=1.0)
    if unbiased and count > 1:
        var = var * count / (count - 1)
    return mean, var, count


def masked_whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
                  reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Normalise the masked entries of ``x`` to unit variance (and zero mean when ``shift_mean``); with ``reduce``
    (``masked_moments``) by the mean and variance of the whole batch ``x`` is a part of."""
    mask_f = mask.to(x.dtype)
    mean, var, _ = masked_moments(x, mask_f, reduce=reduce)
    whitened = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        whitened = whitened + mean
    return whitened * mask_f
