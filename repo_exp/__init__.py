"""repo_exp: safe-RLHF experiments comparing Safe RLHF's average cost constraint with RePO's per-prompt rectified
constraint. ``python -m repo_exp --help`` lists the config groups."""

__version__ = "0.1.0"
