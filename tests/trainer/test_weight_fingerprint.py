"""The weight fingerprint the trainer dumps beside its final logits (KVFORGE_DUMP_LOGITS): equal for equal
weights, different for a one-ulp change or shards put back in the wrong place."""

import torch

from kvforge.trainer.train import weight_fingerprint


def test_equal_weights_give_equal_fingerprints_in_their_dtype():
    weight = torch.randn(576, 192, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    assert weight_fingerprint(weight) == weight_fingerprint(weight.clone())
    # The export is written in float32 and loaded in the engine's dtype: the cast back gives the same bits.
    assert weight_fingerprint(weight.float().to(torch.bfloat16)) == weight_fingerprint(weight)
    assert weight_fingerprint(weight.t().contiguous().t()) == weight_fingerprint(weight)  # any layout


def test_one_ulp_anywhere_changes_the_fingerprint():
    weight = torch.randn(576, 192, generator=torch.Generator().manual_seed(1)).to(torch.bfloat16)
    changed = weight.clone().view(-1)
    changed.view(torch.int16)[12_345] += 1  # the next bf16 value: one unit in the last place
    assert changed[12_345] != weight.view(-1)[12_345]
    assert weight_fingerprint(changed) != weight_fingerprint(weight)


def test_shards_in_the_wrong_order_change_the_fingerprint():
    weight = torch.randn(1000, 64, generator=torch.Generator().manual_seed(2))
    halves = weight.view(-1).chunk(2)
    swapped = torch.cat([halves[1], halves[0]]).view_as(weight)
    assert weight_fingerprint(swapped) != weight_fingerprint(weight)
