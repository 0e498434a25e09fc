"""Prompt sets and preference rows."""

from repo_exp.data.prompts import PromptBatch, PromptSet, PromptStream, load_prompt_set

__all__ = ["PromptBatch", "PromptSet", "PromptStream", "load_prompt_set"]
