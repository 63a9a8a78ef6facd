"""The eval rows each rank scores: together, the same rows on 1, 2, 4 or 8 GPUs (issue 14: a 2-GPU run's eval is
comparable with the 1-GPU run's), in equal counts per rank (ZeRO-3 needs every rank in each forward)."""

import pytest
import torch

from kvforge.trainer.train import eval_shard


@pytest.mark.parametrize("available", [64, 100, 48])
def test_the_ranks_together_score_the_same_rows_on_any_number_of_gpus(available):
    rows = torch.arange(available).view(-1, 1)
    limit = 8 * 8  # training.eval_batches x eval.batch_size
    expected = rows[:min(available, limit)]
    for world in (1, 2, 4, 8):
        shards = [eval_shard(rows, limit, rank, world) for rank in range(world)]
        assert len({len(s) for s in shards}) == 1  # equal counts
        assert torch.equal(torch.cat(shards), expected), world


def test_an_uneven_split_drops_only_the_remainder_and_every_rank_gets_a_row():
    rows = torch.arange(10).view(-1, 1)
    assert torch.equal(torch.cat([eval_shard(rows, 64, r, 3) for r in range(3)]), rows[:9])
    assert [len(eval_shard(rows, 1, r, 4)) for r in range(4)] == [1, 1, 1, 1]  # fewer asked for than ranks
