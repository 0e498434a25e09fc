"""Hydra plugins of repo_exp, installed as ``hydra_plugins.repo_exp_plugins`` (Hydra finds plugins only there)."""
