"""Batch plans (what each process sees in each step, whatever the number of processes) and the
host-cache staging path."""
import threading
import time

import numpy as np
import pytest
import torch
from torch._dynamo.testing import CompileCounter

from src.config import ConfigError, load_config
from src.data import cache, loaders
from src.data.dataset import ClassIndex, DatasetError, PreparedData
from src.data.loaders import (IGNORED, STAGING_SLOTS, BatchSource, batch_plan, build_source, pad_batch, refill,
                              staged_batches)
from src.parallel import WorkerDied
from src.training.train import batch_stats
from tests.conftest import write_config


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


@pytest.mark.parametrize("n, world", [(1044, 1), (1045, 1), (1043, 1), (17, 2), (5, 4)])
def test_evaluation_batches_are_as_few_as_fit_and_differ_in_size_by_one_at_most(n, world):
    for rank_plan in plans(n, 128, world, train=False):
        sizes = [len(batch) for batch in rank_plan]
        assert max(sizes) <= 128 // world and max(sizes) - min(sizes) <= 1
        assert len(sizes) == -(-sum(sizes) // (128 // world))
        assert sizes == sorted(sizes, reverse=True)  # the first is the largest: the training loop pads to it
    [single] = plans(1044, 128, 1, train=False)
    assert [len(batch) for batch in single] == [116] * 9  # not 8 x 128 + 20


@pytest.mark.parametrize("n, batch, world, train", [(103, 16, 2, True), (17, 8, 2, False), (0, 4, 2, False),
                                                     (1, 4, 2, False), (129, 128, 1, True)])
def test_length_matches_the_plan(n, batch, world, train):
    for rank in range(world):
        source = BatchSource(labels=torch.zeros(n), augment=None, train=train, batch_size=batch, seed=3,
                             device=torch.device("cpu"), rank=rank, world_size=world)
        assert len(source) == len(source.plan(0))


def test_a_cache_worker_that_dies_is_a_one_line_config_error(tiny_data, tmp_path, monkeypatch):
    """A decoding process killed (out of memory, say) while the cache is built: one line naming
    data.workers, not a hang (multiprocessing.Pool's behaviour) nor a traceback."""
    def dies(*_args, **_kwargs):
        raise WorkerDied("a worker process died without a result (out of memory?); try fewer workers than 2")
        yield  # a generator, as the real one

    monkeypatch.setattr(cache, "map_in_processes", dies)
    config = load_config(write_config(tmp_path, tiny_data, **{"data.workers": 2}))
    data = PreparedData.load(config.data.root)
    rows = data.split("train")
    with pytest.raises(ConfigError, match=r"^data.workers: building the image cache, a worker process died"):
        build_source(config, rows, data.raw_dir, ClassIndex.from_rows(rows), train=True, device=torch.device("cpu"))


def _memory_mapped_cache(tmp_path, n=31, size=6):
    array = np.random.default_rng(0).integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    array.tofile(tmp_path / "cache.u8")
    return torch.from_numpy(np.memmap(tmp_path / "cache.u8", dtype=np.uint8, mode="c", shape=array.shape))


def test_staged_batches_gather_every_batch_from_a_memory_mapped_cache(tmp_path):
    """The staging logic on the CPU: more batches than buffers, a short last batch. Here a batch is a
    view of its buffer (no copy to a GPU), so each one is checked before the next is gathered."""
    images = _memory_mapped_cache(tmp_path)
    plan = batch_plan(len(images), 4, train=False, seed=0, epoch=0)
    assert len(plan) > 2 * STAGING_SLOTS and len(plan[-1]) == 3
    for indices, pixels in zip(plan, staged_batches(images, plan, torch.device("cpu")), strict=True):
        assert torch.equal(pixels, images[indices])


def test_a_staged_batch_is_handed_over_only_once_gathered(tmp_path, monkeypatch):
    """A gather slower than the loop (a cold page cache): each batch waits for its own gather."""
    images = _memory_mapped_cache(tmp_path)
    real_take = np.take

    def slow_take(*args, **kwargs):
        time.sleep(0.02)
        return real_take(*args, **kwargs)

    monkeypatch.setattr(loaders.np, "take", slow_take)
    plan = batch_plan(len(images), 4, train=False, seed=0, epoch=0)
    for indices, pixels in zip(plan, staged_batches(images, plan, torch.device("cpu")), strict=True):
        assert torch.equal(pixels, images[indices])


def test_staged_batches_stop_their_gather_thread_when_the_loop_stops_early(tmp_path):
    images = _memory_mapped_cache(tmp_path)
    batches = staged_batches(images, batch_plan(len(images), 4, train=False, seed=0, epoch=0), torch.device("cpu"))
    next(batches)
    gatherers = lambda: [t for t in threading.enumerate() if t.name.startswith("cache-gather")]  # noqa: E731
    assert gatherers()  # gathering the next batch
    batches.close()  # what a `break` out of the training loop does
    assert not gatherers()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned buffers and asynchronous copies need CUDA")
def test_staged_batches_on_the_gpu_survive_the_reuse_of_their_buffers(tmp_path):
    images = _memory_mapped_cache(tmp_path, n=200, size=32)
    plan = batch_plan(len(images), 16, train=True, seed=1, epoch=0)
    kept = list(staged_batches(images, plan, torch.device("cuda")))  # all held: buffers reused meanwhile
    for indices, pixels in zip(plan, kept, strict=True):
        assert pixels.is_cuda and torch.equal(pixels.cpu(), images[indices])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="pinned buffers and asynchronous copies need CUDA")
def test_a_staging_buffer_is_reused_only_after_the_copy_on_its_own_gpu(tmp_path, monkeypatch):
    """The copy to `cuda:N` runs on that GPU's stream. The event that guards a buffer's reuse was
    recorded on the current device's stream instead (`Event.record()` with no stream): on `cuda:1`
    with GPU 0 current, it did not wait for the copy, and the buffer could be refilled while copied."""
    device = torch.device("cuda", torch.cuda.device_count() - 1)  # another than the current one, given two
    streams = []

    class RecordedEvent(torch.cuda.Event):
        def record(self, stream=None):
            streams.append(stream)
            return super().record(stream)

    monkeypatch.setattr(torch.cuda, "Event", RecordedEvent)
    images = _memory_mapped_cache(tmp_path, n=40, size=16)
    plan = batch_plan(len(images), 8, train=True, seed=1, epoch=0)
    for indices, pixels in zip(plan, staged_batches(images, plan, device), strict=True):
        assert pixels.device == device and torch.equal(pixels.cpu(), images[indices])
    assert len(streams) == len(plan) and all(stream is not None and stream.device == device for stream in streams)


def test_a_cache_too_large_for_the_gpu_stays_in_host_memory(tiny_data, tmp_path, monkeypatch, caplog):
    """`data.cache_on_device: true` (the default) with a GPU that cannot hold the cache, simulated here:
    the copy runs out of GPU memory. Before, training and evaluation ended in torch's OutOfMemoryError
    traceback; now the cache is staged from host memory, as with `false`, and a warning says so."""
    config, data, rows = _rows_and_config(tiny_data, tmp_path, "train")
    copy, make_tensor = torch.Tensor.to, torch.tensor

    def out_of_gpu_memory(tensor, *args, **kwargs):
        if any(str(arg).startswith("cuda") for arg in (*args, *kwargs.values())):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return copy(tensor, *args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", out_of_gpu_memory)
    monkeypatch.setattr(torch, "tensor", lambda *args, device=None, **kwargs: make_tensor(*args, **kwargs))  # labels
    source = build_source(config, rows, data.raw_dir, ClassIndex.from_rows(rows), train=True,
                          device=torch.device("cuda"))
    assert source.device.type == "cuda" and source.images.device.type == "cpu"  # staged_batches' path
    assert "does not fit in the free memory of cuda" in caplog.text and "data.cache_on_device: false" in caplog.text


def test_a_training_batch_with_unreadable_images_keeps_its_size():
    pixels, labels = torch.arange(3).view(3, 1) * 10, torch.tensor([0, 1, 2])
    filled, filled_labels = refill(pixels, labels, missing=4)
    assert filled_labels.tolist() == [0, 1, 2, 0, 1, 2, 0] and filled.view(-1).tolist() == [0, 10, 20, 0, 10, 20, 0]
    with pytest.raises(DatasetError, match="all 2 images of a training batch could not be read"):
        refill(torch.empty(0), torch.empty(0, dtype=torch.long), missing=2)


def test_padding_rows_change_no_validation_figure():
    """Validation pads a smaller batch with IGNORED rows: loss, hits and count are those of the real rows."""
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(5, 3, 4, 4, generator=generator).to(memory_format=torch.channels_last)
    logits, labels = torch.randn(5, 7, generator=generator), torch.tensor([0, 3, 6, 3, 1])
    padded_images, padded_labels = pad_batch(images, labels, 8)
    assert padded_images.shape == (8, 3, 4, 4) and padded_images.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(padded_images[5:], images[4:].expand(3, -1, -1, -1))
    assert padded_labels.tolist() == labels.tolist() + [IGNORED] * 3
    padded_logits = torch.cat([logits, logits[4:].expand(3, -1)])  # the model's output on the repeated image
    real = batch_stats(torch.nn.functional.cross_entropy(logits, labels), logits, labels)
    loss = torch.nn.functional.cross_entropy(padded_logits, padded_labels, ignore_index=IGNORED)
    torch.testing.assert_close(batch_stats(loss, padded_logits, padded_labels), real)
    assert real[3] == 5


@pytest.mark.parametrize("train", [True, False])
def test_the_plain_and_cached_pipelines_give_the_same_batches(tiny_data, tmp_path, train):
    """One decode function and one augmentation: the fallback pipeline trains on the same pixels."""
    batches = {}
    for pipeline in ("plain", "cached"):
        config = load_config(write_config(tmp_path, tiny_data, pipeline, **{"data.pipeline": pipeline,
                                                                             "trainer.batch_size": 8}))
        data = PreparedData.load(config.data.root)
        rows = data.split("train" if train else "val")
        source = build_source(config, rows, data.raw_dir, ClassIndex.from_rows(rows), train=train,
                              device=torch.device("cpu"))
        batches[pipeline] = list(source.batches(epoch=1))
    assert len(batches["plain"]) == len(batches["cached"]) > 1
    for (plain_images, plain_labels), (cached_images, cached_labels) in zip(batches["plain"], batches["cached"]):
        assert torch.equal(plain_labels, cached_labels) and torch.equal(plain_images, cached_images)


@pytest.mark.parametrize("pipeline", ["plain", "cached"])
def test_padded_evaluation_batches_have_one_size_and_the_same_images(tiny_data, tmp_path, pipeline):
    """Padding comes before the augmentation, which (compiled) then sees a single shape as well."""
    config = load_config(write_config(tmp_path, tiny_data, **{"data.pipeline": pipeline, "trainer.batch_size": 8}))
    data = PreparedData.load(config.data.root)
    rows = data.split("val")[:11]  # two batches, of 6 and 5 images
    sources = {pad: build_source(config, rows, data.raw_dir, ClassIndex.from_rows(rows), train=False,
                                 device=torch.device("cpu"), pad=pad) for pad in (False, True)}
    plain, padded = (list(sources[pad].batches(0)) for pad in (False, True))
    assert len({len(labels) for _, labels in padded}) == 1 and len({len(labels) for _, labels in plain}) == 2
    for (images, labels), (padded_images, padded_labels) in zip(plain, padded):
        real = padded_labels != IGNORED
        assert torch.equal(padded_labels[real], labels) and torch.equal(padded_images[real], images)
        assert padded_images.is_contiguous(memory_format=torch.channels_last)


@pytest.mark.parametrize("train", [True, False])
def test_batches_come_in_the_dtype_asked_for(tiny_data, tmp_path, train):
    """Training under bf16 autocast asks for bf16 images: the model's first layer would cast them anyway."""
    config, data, rows = _rows_and_config(tiny_data, tmp_path, "val")
    source = build_source(config, rows, data.raw_dir, ClassIndex.from_rows(rows), train=train,
                          device=torch.device("cpu"), dtype=torch.bfloat16)
    assert {images.dtype for images, _ in source.batches(1)} == {torch.bfloat16}


def test_batches_follow_trainer_channels_last(tiny_data, tmp_path):
    data = PreparedData.load(tiny_data)
    rows = data.split("val")[:11]  # two padded batches of 8
    for channels_last in (True, False):
        config = load_config(write_config(tmp_path, tiny_data, **{"trainer.channels_last": channels_last,
                                                                  "trainer.batch_size": 8}))
        for train in (True, False):
            source = build_source(config, rows, data.raw_dir, ClassIndex.from_rows(rows), train=train,
                                  device=torch.device("cpu"), pad=not train)
            for images, _ in source.batches(1):
                assert images.is_contiguous(memory_format=torch.channels_last) == channels_last, (train, channels_last)
                assert images.is_contiguous() != channels_last


@pytest.mark.parametrize("pipeline", ["plain", "cached"])
def test_an_unreadable_image_is_counted_every_epoch_and_batches_keep_their_size(tiny_data, tmp_path, pipeline):
    config = load_config(write_config(tmp_path, tiny_data, **{"data.pipeline": pipeline, "trainer.batch_size": 8}))
    data = PreparedData.load(config.data.root)
    rows = data.split("train")
    rows[0] = ("gone/missing.png", rows[0][1])  # deleted after prepare
    source = build_source(config, rows, data.raw_dir, ClassIndex.from_rows(rows), train=True,
                          device=torch.device("cpu"))
    for epoch in (1, 2):
        sizes = [len(labels) for _, labels in source.batches(epoch)]
        # The cache leaves the image out (one image fewer to batch); the plain pipeline refills its slot.
        assert sizes == [8] * ((len(rows) - (pipeline == "cached")) // 8) and source.skipped == 1


def _rows_and_config(tiny_data, tmp_path, split, **overrides):
    config = load_config(write_config(tmp_path, tiny_data, **{"trainer.batch_size": 8, **overrides}))
    data = PreparedData.load(config.data.root)
    rows = data.split(split)
    return config, data, rows


def test_labels_stay_with_their_images_when_the_cache_leaves_one_out(tiny_data, tmp_path):
    """An unreadable image left out of the cache must not shift the labels of the images after it."""
    config, data, rows = _rows_and_config(tiny_data, tmp_path, "train")
    classes = ClassIndex.from_rows(rows)
    rows[0] = ("gone/missing.png", rows[0][1])
    source = build_source(config, rows, data.raw_dir, classes, train=True, device=torch.device("cpu"))
    assert source.labels.tolist() == [classes.index(name) for _, name in rows[1:]]


def test_every_step_of_an_epoch_draws_its_own_augmentation(tiny_data, tmp_path, monkeypatch):
    config, data, rows = _rows_and_config(tiny_data, tmp_path, "train")
    source = build_source(config, rows, data.raw_dir, ClassIndex.from_rows(rows), train=True,
                          device=torch.device("cpu"))
    seeds, real_draw = [], source.augment.draw

    def recording_draw(n, generator, device):
        seeds.append(generator.initial_seed())
        return real_draw(n, generator, device)

    monkeypatch.setattr(source.augment, "draw", recording_draw)
    for epoch in (1, 2):
        list(source.batches(epoch))
    assert len(seeds) == 2 * len(source) > 2 and len(set(seeds)) == len(seeds)


def test_a_samples_augmentation_does_not_depend_on_the_number_of_processes(tiny_data, tmp_path):
    """Each rank applies its own slice of the global batch's draws: the images of a global step are the
    same whether one process trains or two (what the module docstring promises)."""
    config, data, rows = _rows_and_config(tiny_data, tmp_path, "train")
    classes = ClassIndex.from_rows(rows)

    def batches(rank, world):
        return list(build_source(config, rows, data.raw_dir, classes, train=True, device=torch.device("cpu"),
                                 rank=rank, world_size=world).batches(1))

    single, ranks = batches(0, 1), [batches(rank, 2) for rank in range(2)]
    assert len(single) == len(ranks[0]) == len(ranks[1]) > 0
    for step, (images, labels) in enumerate(single):
        assert torch.equal(torch.cat([ranks[0][step][1], ranks[1][step][1]]), labels)
        assert torch.equal(torch.cat([ranks[0][step][0], ranks[1][step][0]]), images)


def test_an_unreadable_validation_image_is_not_replaced_by_repeats(tiny_data, tmp_path):
    """Training refills a batch with repeats; validation must count every readable image exactly once."""
    config, data, rows = _rows_and_config(tiny_data, tmp_path, "val", **{"data.pipeline": "plain"})
    classes = ClassIndex.from_rows(rows)
    rows[0] = ("gone/missing.png", rows[0][1])
    source = build_source(config, rows, data.raw_dir, classes, train=False, device=torch.device("cpu"), pad=True)
    labels = torch.cat([batch_labels for _, batch_labels in source.batches(0)])
    assert sorted(labels[labels != IGNORED].tolist()) == sorted(classes.index(name) for _, name in rows[1:])
    assert source.skipped == 1


@pytest.mark.parametrize("pipeline", ["plain", "cached"])
def test_batches_from_a_step_are_those_an_uninterrupted_epoch_gives_there(tiny_data, tmp_path, pipeline):
    """A run resumed mid-epoch (`batches(epoch, start_step)`) sees the same images, labels and
    augmentation draws from that step on: the draws are seeded by the step, not by the count."""
    config, data, rows = _rows_and_config(tiny_data, tmp_path, "train", **{"data.pipeline": pipeline})
    source = build_source(config, rows, data.raw_dir, ClassIndex.from_rows(rows), train=True,
                          device=torch.device("cpu"))
    whole, resumed = list(source.batches(1)), list(source.batches(1, start_step=2))
    assert len(whole) > 3 and len(resumed) == len(whole) - 2
    for (images, labels), (resumed_images, resumed_labels) in zip(whole[2:], resumed):
        assert torch.equal(labels, resumed_labels) and torch.equal(images, resumed_images)


def test_evaluation_splits_keep_the_augmentation_eager_and_validation_compiles_it_once(tiny_data, tmp_path,
                                                                                        monkeypatch):
    """With trainer.compile on a GPU (forced onto the CPU here, counted by a compile-counting backend),
    evaluation's source per split, each with batches of its own sizes, compiled the eval augmentation
    again for each new batch size (3 times for these 5 splits): now they stay eager. Training's validation,
    padded to one shape, compiles once. The images are the eager ones either way."""
    torch._dynamo.reset()
    counter, compile_ = CompileCounter(), torch.compile
    monkeypatch.setattr(torch, "compile", lambda function, **options: compile_(function, **options, backend=counter))
    monkeypatch.setattr(loaders, "COMPILED_AUGMENTATION_DEVICES", ("cpu",))
    data = PreparedData.load(tiny_data)
    splits = {name: data.split(name, open_set=True) for name in ("train", "val", "test", "unknown_val", "unknown_test")}

    def batches(compiled, pad=False, names=tuple(splits)):
        config = load_config(write_config(tmp_path, tiny_data, **{"trainer.compile": compiled}))
        return {name: list(build_source(config, splits[name], data.raw_dir, ClassIndex.from_rows(splits[name]),
                                        train=False, device=torch.device("cpu"), batch_size=8, pad=pad).batches(0))
                for name in names}

    eager, compiled = batches(False), batches(True)
    assert len({len(labels) for split in eager.values() for _, labels in split}) > 2  # shapes to compile for
    assert counter.frame_count == 0
    for name in splits:
        for (images, labels), (eager_images, eager_labels) in zip(compiled[name], eager[name], strict=True):
            assert torch.equal(labels, eager_labels) and torch.equal(images, eager_images)
    padded_eager = batches(False, True, ["val"])["val"]
    assert counter.frame_count == 0  # trainer.compile off: validation stays eager too
    padded = batches(True, True, ["val"])["val"]
    assert counter.frame_count == 1
    for (images, labels), (eager_images, eager_labels) in zip(padded, padded_eager, strict=True):
        assert torch.equal(labels, eager_labels) and torch.equal(images, eager_images)
