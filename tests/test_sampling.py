"""The look-ahead into the Trainer's order, checked against what accelerate's prepared loaders actually yield."""

import pytest
import torch
from accelerate.data_loader import prepare_data_loader
from torch.utils.data import DataLoader, RandomSampler

from reflect_trainer.sampling import loader_sampler, rank_batches, record_order


def test_recording_an_order_leaves_the_order_unchanged():
    plain = RandomSampler(range(17), generator=torch.Generator().manual_seed(3))
    recorded = RandomSampler(range(17), generator=torch.Generator().manual_seed(3))
    assert record_order(recorded) and isinstance(recorded, RandomSampler)
    for _ in range(2):  # two epochs: the generator advances the same way
        drawn = list(recorded)
        assert drawn == list(plain) and drawn == recorded.recorded_order


@pytest.mark.parametrize("drop_last", [False, True], ids=["pad_last_batch", "drop_last"])
@pytest.mark.parametrize("world", [1, 2], ids=["one_rank", "two_ranks"])
def test_rank_batches_are_the_batches_each_rank_is_given(world, drop_last):
    for rank in range(world):
        loader = DataLoader(range(11), batch_size=2, drop_last=drop_last,
                            sampler=RandomSampler(range(11), generator=torch.Generator().manual_seed(5)))
        prepared = prepare_data_loader(loader, num_processes=world, process_index=rank, put_on_device=False)
        batch_sampler, sampler = loader_sampler(prepared)
        assert record_order(sampler)
        given = [batch.tolist() for batch in prepared]
        assert rank_batches(batch_sampler, sampler.recorded_order) == given
        if world == 2 and not drop_last:
            assert len(given) == 3  # 11 rows: rank 1's last batch is padded from the start of the order
