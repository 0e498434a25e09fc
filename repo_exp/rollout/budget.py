"""How many tokens a batch may generate.

With ``trainer.max_length`` unset, ``max_new_tokens``. With it set, the published Safe RLHF convention: the limit
counts the prompt too (its generation ``max_length`` 512), so a batch whose left-padded prompts are ``width`` tokens
wide gets ``max_length − width`` new tokens. Across data-parallel ranks the smallest budget is taken, so that every
rank runs the same number of decoding steps (ZeRO-3 needs each forward pass on every rank) and no sequence exceeds
``max_length``.
"""

from __future__ import annotations

from typing import Callable

import torch


def generation_budget(max_new_tokens: int, max_length: int | None, prompt_width: int,
                      all_gather: Callable[[torch.Tensor], torch.Tensor] | None = None,
                      device: torch.device | str = "cpu") -> int:
    if max_length is None:
        return max_new_tokens
    budget = max_length - prompt_width
    if all_gather is not None:
        budget = int(all_gather(torch.tensor([budget], device=device)).min())
    if budget < 1:
        raise ValueError(f"prompts {prompt_width} tokens wide leave no room under trainer.max_length={max_length}: "
                         f"set trainer.max_prompt_length below trainer.max_length")
    return budget
