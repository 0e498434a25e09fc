"""The typed record of one rollout batch on one rank.

Shapes: B samples, prompt width P (left-padded), response width T (right-padded), L = P + T.
Token ``sequences[:, P + t]`` is response token ``t``; its log-probability comes from the logits at ``P + t − 1``,
and its value ``V_t`` is the critic's output at the same position (the state before emitting it).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace
from typing import Iterator

import torch


@dataclass
class Experience:
    sequences: torch.Tensor  # (B, L) prompt then response token ids
    attention_mask: torch.Tensor  # (B, L) 1 on real prompt tokens and on response tokens through EOS
    response_mask: torch.Tensor  # (B, T) 1 on the response tokens that count (through EOS)
    prompt_index: torch.Tensor  # (B,) global id of the prompt each sample answers; k samples share one
    logprobs: torch.Tensor  # (B, T) log π_old(y_t) of the sampled tokens, under the distribution sampled from
    ref_logprobs: torch.Tensor  # (B, T) log π_ref(y_t) at the sampling temperature (no top-k / top-p truncation)
    rewards: torch.Tensor  # (B,) R(x, y), end score of the reward model (plus any missing-EOS penalty)
    costs: torch.Tensor  # (B,) C(x, y), end score of the cost model: > 0 unsafe
    truncated: torch.Tensor  # (B,) bool, no EOS within max_new_tokens
    prompts: list[str] = field(default_factory=list)  # the raw user inputs
    responses: list[str] = field(default_factory=list)  # decoded responses
    reward_values: torch.Tensor | None = None  # (B, T) V_r(s_t) before the update
    cost_values: torch.Tensor | None = None  # (B, T) V_c(s_t) before the update
    kl: torch.Tensor | None = None  # (B, T) masked log π_old − log π_ref
    reward_advantages: torch.Tensor | None = None  # (B, T)
    reward_returns: torch.Tensor | None = None  # (B, T)
    cost_advantages: torch.Tensor | None = None  # (B, T)
    cost_returns: torch.Tensor | None = None  # (B, T)
    advantages: torch.Tensor | None = None  # (B, T) what the policy loss sees, mixed by the constraint
    cost_active: torch.Tensor | None = None  # (B,) bool, samples whose advantage carries a cost term
    penalised: torch.Tensor | None = None  # (B,) bool, samples the constraint counts as violating
    cost_signal: torch.Tensor | None = None  # (B,) end value of the cost signal A_c is estimated on (whole batch)

    @property
    def batch_size(self) -> int:
        return self.sequences.shape[0]

    @property
    def prompt_width(self) -> int:
        return self.sequences.shape[1] - self.response_mask.shape[1]

    @property
    def response_width(self) -> int:
        return self.response_mask.shape[1]

    def select(self, index: torch.Tensor | slice) -> "Experience":
        """The samples at ``index`` (every per-sample field sliced along dim 0)."""
        out = {}
        idx_list = list(range(self.batch_size))[index] if isinstance(index, slice) else index.tolist()
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor):
                out[f.name] = value[index]
            elif isinstance(value, list) and value:
                out[f.name] = [value[i] for i in idx_list]
            else:
                out[f.name] = value
        return replace(self, **out)

    def split(self, size: int) -> Iterator["Experience"]:
        """Consecutive chunks of at most ``size`` samples."""
        for start in range(0, self.batch_size, size):
            yield self.select(slice(start, start + size))

    def trimmed(self) -> "Experience":
        """The same samples without the columns that are padding in every row: prompt columns on the left, response
        columns past the longest response (every (B, L) and (B, T) field cut alike). Positions come from the
        attention mask, so the passes over what is left compute what they computed over the padded rows."""
        longest = max(1, int(self.response_mask.sum(-1).max())) if self.batch_size else self.response_width
        first = int(self.attention_mask[:, : self.prompt_width].any(0).long().argmax())
        width, total = self.response_width, self.sequences.shape[1]
        if longest == width and first == 0:
            return self
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor) and value.dim() == 2:
                if value.shape[1] == total:  # (B, L)
                    out[f.name] = value[:, first : total - (width - longest)]
                elif value.shape[1] == width:  # (B, T)
                    out[f.name] = value[:, :longest]
        return replace(self, **out)

    @staticmethod
    def concat(parts: list["Experience"]) -> "Experience":
        """Join chunks generated separately; response widths are right-padded to the widest."""
        width = max(p.response_width for p in parts)
        padded = [p.pad_response(width) for p in parts]
        out = {}
        for f in fields(Experience):
            values = [getattr(p, f.name) for p in padded]
            if all(isinstance(v, torch.Tensor) for v in values):
                out[f.name] = torch.cat(values, dim=0)
            elif all(isinstance(v, list) for v in values):
                out[f.name] = [x for v in values for x in v]
            else:
                out[f.name] = None
        return Experience(**out)

    def pad_response(self, width: int) -> "Experience":
        """Right-pad every (B, T) and (B, L) field to response width ``width`` with zeros."""
        extra = width - self.response_width
        if extra <= 0:
            return self
        out = {}
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, torch.Tensor) and value.dim() == 2:
                out[f.name] = torch.nn.functional.pad(value, (0, extra))
        return replace(self, **out)
