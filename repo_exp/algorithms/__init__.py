"""The math of PPO-Lagrangian training as small pure functions over tensors and masks.

Nothing here imports more than torch, so every function is tested on CPU without DeepSpeed, W&B or a network.
"""

from repo_exp.algorithms.masked import (aggregation_count, masked_mean, masked_moments, masked_sum, masked_var,
                                        masked_whiten)
from repo_exp.algorithms.streams import end_index, token_streams
from repo_exp.algorithms.gae import gae_advantages
from repo_exp.algorithms.estimators import ESTIMATORS, group_advantages, kl_k3, kl_penalty, leave_one_out_advantages
from repo_exp.algorithms.losses import critic_loss, policy_loss, ptx_loss, ptx_tokens, token_logprobs

__all__ = [
    "aggregation_count",
    "masked_mean",
    "masked_moments",
    "masked_sum",
    "masked_var",
    "masked_whiten",
    "end_index",
    "token_streams",
    "gae_advantages",
    "ESTIMATORS",
    "group_advantages",
    "kl_k3",
    "kl_penalty",
    "leave_one_out_advantages",
    "critic_loss",
    "policy_loss",
    "ptx_loss",
    "ptx_tokens",
    "token_logprobs",
]
