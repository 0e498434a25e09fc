"""Rollout: the experience record, generation, scoring and making experience."""

from repo_exp.rollout.experience import Experience
from repo_exp.rollout.generate import Generation, generate, sampling_generator
from repo_exp.rollout.make import Timings, decode_responses, make_experience
from repo_exp.rollout.score import Scorer, critic_values, sequence_logprobs

__all__ = [
    "Experience",
    "Generation",
    "generate",
    "sampling_generator",
    "Timings",
    "decode_responses",
    "make_experience",
    "Scorer",
    "critic_values",
    "sequence_logprobs",
]
