"""Batch plans: what each process sees in each step, whatever the number of processes."""
import pytest
import torch

from src.data.loaders import BatchSource, batch_plan


def plans(n, batch, world, train, epoch=0):
    return [batch_plan(n, batch, train=train, seed=3, epoch=epoch, rank=r, world_size=world) for r in range(world)]


@pytest.mark.parametrize("world", [1, 2, 4])
def test_a_global_training_batch_holds_the_same_images_for_any_number_of_processes(world):
    [single] = plans(103, 16, 1, train=True)
    split = plans(103, 16, world, train=True)
    assert len(single) == 103 // 16  # the last partial batch is dropped
    for step, batch in enumerate(single):
        assert torch.equal(torch.cat([rank_plan[step] for rank_plan in split]), batch)


def test_training_order_is_a_seeded_permutation_per_epoch():
    [first] = plans(64, 8, 1, train=True, epoch=1)
    [again] = plans(64, 8, 1, train=True, epoch=1)
    [second] = plans(64, 8, 1, train=True, epoch=2)
    assert all(torch.equal(a, b) for a, b in zip(first, again))
    assert not all(torch.equal(a, b) for a, b in zip(first, second))
    assert sorted(torch.cat(first).tolist()) == list(range(64))


@pytest.mark.parametrize("n, world", [(17, 2), (18, 2), (5, 4), (1, 2), (0, 1)])
def test_evaluation_sees_every_image_once(n, world):
    seen = sorted(i for rank_plan in plans(n, 8, world, train=False) for batch in rank_plan for i in batch.tolist())
    assert seen == list(range(n))


@pytest.mark.parametrize("n, batch, world, train", [(103, 16, 2, True), (17, 8, 2, False), (0, 4, 2, False),
                                                     (1, 4, 2, False), (129, 128, 1, True)])
def test_length_matches_the_plan(n, batch, world, train):
    for rank in range(world):
        source = BatchSource(labels=torch.zeros(n), augment=None, train=train, batch_size=batch, seed=3,
                             device=torch.device("cpu"), rank=rank, world_size=world)
        assert len(source) == len(source.plan(0))
