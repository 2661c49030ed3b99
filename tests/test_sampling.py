"""The generation-buffer sampler, checked against how accelerate shards batches across ranks."""

from accelerate.data_loader import BatchSamplerShard
from torch.utils.data import BatchSampler

from reflect_trainer.sampling import RecycleBufferSampler


def rank_batches(sampler, rank, world):
    batch_sampler = BatchSampler(sampler, batch_size=sampler.batch_size * sampler.buffer_batches, drop_last=False)
    return list(BatchSamplerShard(batch_sampler, num_processes=world, process_index=rank))


def test_each_rank_gets_its_buffer_slice_once_per_micro_batch():
    sampler = RecycleBufferSampler(20, batch_size=2, buffer_batches=3, world_size=2, seed=1)
    for rank in (0, 1):
        batches = rank_batches(sampler, rank, 2)
        # every dataloader batch is one buffer slice, repeated with k = 0, 1, 2
        for start in range(0, len(batches), 3):
            group = batches[start : start + 3]
            assert [{k for _, k in b} for b in group] == [{0}, {1}, {2}]
            assert len({tuple(i for i, _ in b) for b in group}) == 1
        assert {i for b in batches for i, _ in b} == sampler.rank_share(0, rank)
    # the ranks' shares cover the data, and overlap only in the padding of the last buffer
    shares = [sampler.rank_share(0, r) for r in (0, 1)]
    assert shares[0] | shares[1] == set(range(20))
    assert len(shares[0]) + len(shares[1]) == 24  # 20 rows padded to 2 buffers of 12


def test_order_is_reproducible_per_epoch_and_differs_between_epochs():
    sampler = RecycleBufferSampler(50, batch_size=4, buffer_batches=2, seed=3)
    assert sampler.order(0) == sampler.order(0)
    assert sampler.order(0) != sampler.order(1)
    sampler.set_epoch(1)
    assert [i for i, k in sampler if k == 0] == sampler.order(1)
    assert len(sampler) == len(list(sampler)) == 56 * 2
