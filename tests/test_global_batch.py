"""Data-parallel updates are the global batch's: two gloo ranks under DeepSpeed (ZeRO-2 and ZeRO-3) holding
different numbers of response tokens and different scores take, in one step, the update one process takes holding
the whole batch — every parameter's change within 1e-6 of the update's scale in fp32 — and log the same figures.
One case per loss aggregation and per other batch statistic the update divides by or centres with (advantage
whitening, group baselines with grpo's KL term, the PTX loss joint and separate); ``tests/global_batch_worker.py``
runs the ranks. The pure reductions are checked on hand-split batches first."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from repo_exp.algorithms import aggregation_count, masked_mean, masked_whiten
from repo_exp.train import UpdateStats

from conftest import repo_root
from global_batch_worker import CASES, one_process

REPO = repo_root()
TOLERANCE = 1e-6  # of the largest parameter change: fp32 sums in another order (gloo all-reduce vs one process)
SHAPE_OF_THE_UPDATE = ("timing/", "throughput/", "update/")  # each rank's own micro-batches: not the batch's figures


# ------------------------------------------------------------------------------------ the reductions, by hand


def _parts() -> tuple[torch.Tensor, torch.Tensor, list[slice]]:
    """A batch of 5 responses of different lengths, split as two ranks would hold it: 3 rows (9 tokens), 2 rows
    (2 tokens)."""
    x = torch.arange(1.0, 31.0).reshape(5, 6)
    lengths = torch.tensor([6, 2, 1, 1, 1])
    mask = (torch.arange(6)[None] < lengths[:, None]).float()
    return x, mask, [slice(0, 3), slice(3, 5)]


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean_token_mean"])
def test_parts_divided_by_the_batch_count_add_up_to_the_batch_mean(aggregation):
    x, mask, parts = _parts()
    whole = masked_mean(x, mask, aggregation)
    count = sum(aggregation_count(mask[p], aggregation) for p in parts)
    shares = [masked_mean(x[p], mask[p], aggregation, count) for p in parts]
    torch.testing.assert_close(sum(shares), whole)
    # by hand: 11 tokens; rows' means 3.5, 7.5, 13, 19, 25
    expected = {"token_mean": (21 + 15 + 13 + 19 + 25) / 11, "seq_mean_token_mean": (3.5 + 7.5 + 13 + 19 + 25) / 5}
    assert float(whole) == pytest.approx(expected[aggregation])
    # each part's own mean, averaged over the parts as data-parallel ranks average gradients, is not the batch's
    local = sum(masked_mean(x[p], mask[p], aggregation) for p in parts) / len(parts)
    assert abs(float(local) - float(whole)) > 1.0


def test_whitening_a_part_with_the_batch_moments_gives_the_whole_batch_whitened():
    """``masked_whiten(reduce=…)`` asks for two sums over the parts (the sum and count, then the squared deviations
    from the batch mean); handed the sums over both parts, one part is whitened exactly as inside the whole batch."""
    x, mask, parts = _parts()
    whole = masked_whiten(x, mask)
    first = [torch.stack([(x[p] * mask[p]).sum(), mask[p].sum()]) for p in parts]
    mean = sum(f[0] for f in first) / sum(f[1] for f in first)
    squares = sum(((x[p] - mean) ** 2 * mask[p]).sum() for p in parts)
    sums = iter([sum(first), squares.reshape(1)])
    p = parts[0]
    torch.testing.assert_close(masked_whiten(x[p], mask[p], reduce=lambda t: next(sums)), whole[p])
    assert not torch.allclose(masked_whiten(x[p], mask[p]), whole[p])  # its own moments whiten it otherwise


def test_update_stats_are_ratios_of_sums_over_parts():
    stats = UpdateStats()
    stats.add("loss/actor", 0.3, 0.25)  # a micro-batch's share of the loss, over its share of the batch
    stats.add("loss/actor", 0.5, 0.75)
    stats.add("policy/ratio", 2.0 * 3, 3)  # a token mean over 3 tokens
    stats.add("policy/ratio", 1.0 * 1, 1)
    assert stats.result() == pytest.approx({"loss/actor": 0.8, "policy/ratio": 7 / 4})
    doubled = stats.result(reduce=lambda t: 2 * t)  # two ranks with the same figures: the same ratios
    assert doubled == pytest.approx({"loss/actor": 0.8, "policy/ratio": 7 / 4})


# --------------------------------------------------------------------------- two ranks against one process


def _ranks(out: Path, stage: str, cases: list[str]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                           str(REPO / "tests" / "global_batch_worker.py"), str(out), stage, *cases],
                          cwd=REPO, capture_output=True, text=True, timeout=1200,
                          env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "disabled", "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-4000:]


FAST = ("zero2", "token_mean")  # the headline case in the fast suite; every other one in make test-slow


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    """``records(stage, case)``: the two-rank record, each stage's cases run once per module in one group."""
    out = tmp_path_factory.mktemp("two_ranks")
    ran: set[tuple[str, str]] = set()

    def records(stage: str, case: str) -> dict:
        if (stage, case) not in ran:
            wanted = [case] if (stage, case) == FAST else [c for c in CASES if (stage, c) != FAST]
            _ranks(out, stage, wanted)
            ran.update((stage, c) for c in wanted)
        return torch.load(out / f"{stage}-{case}.pt", weights_only=False)

    return records


@pytest.mark.deepspeed
@pytest.mark.parametrize("stage,case", [pytest.param(s, c, marks=() if (s, c) == FAST else pytest.mark.slow)
                                        for s in ("zero2", "zero3") for c in CASES])
def test_two_ranks_take_the_update_of_one_process(two_ranks, tmp_path, stage, case):
    double = two_ranks(stage, case)
    single = one_process(case, tmp_path / "single")
    tokens = [rank["tokens"] for rank in double["batch"]]
    rewards = [rank["rewards"] for rank in double["batch"]]
    assert tokens[0] != tokens[1] and rewards[0] != rewards[1], "the ranks must hold different batches"
    assert sum(tokens) == single["batch"]["tokens"]

    assert sorted(double["delta"]) == sorted(single["delta"])
    scale = max(float(change.abs().max()) for change in single["delta"].values())
    assert scale > 0.05, "the step must move the parameters for the comparison to mean anything"
    for name, change in single["delta"].items():
        torch.testing.assert_close(double["delta"][name], change, rtol=0, atol=TOLERANCE * scale,
                                   msg=lambda m, name=name: f"{name}: {m}")

    figures = {k for k, v in single["metrics"].items()
               if isinstance(v, float) and not k.startswith(SHAPE_OF_THE_UPDATE)}
    assert figures == {k for k, v in double["metrics"].items()
                       if isinstance(v, float) and not k.startswith(SHAPE_OF_THE_UPDATE)}
    assert {"loss/actor", "policy/ratio", "policy/clipfrac", "policy/approx_kl", "kl/mean"} <= figures
    if "ptx" in case:
        assert "loss/ptx" in figures
    for key in sorted(figures):
        assert double["metrics"][key] == pytest.approx(single["metrics"][key], rel=1e-5, abs=1e-6), key
