"""Training batches (reproducible, resumable, rank-sliced), eval windows, the prefetch thread."""

import numpy as np
import pytest

from sparse_transformer.data.batches import Prefetcher, TrainBatches, eval_batches, eval_windows


def stream(n=5000):
    return np.random.default_rng(0).integers(0, 256, n, dtype=np.uint8)


def test_stream_batches_are_windows_and_reproducible():
    data = stream()
    a = TrainBatches(data, context=64, batch_size=8, seed=3)
    b = TrainBatches(data, context=64, batch_size=8, seed=3)
    x = a.batch(5)
    assert x.shape == (8, 64) and x.dtype == np.uint8
    assert np.array_equal(x, b.batch(5)) and not np.array_equal(x, a.batch(6))
    for row in x:  # each row is a real window of the stream
        starts = np.flatnonzero(np.all(np.lib.stride_tricks.sliding_window_view(data, 64) == row, axis=1))
        assert len(starts) >= 1
    assert not np.array_equal(x, TrainBatches(data, 64, 8, seed=4).batch(5))


def test_resume_continues_the_same_sequence():
    data = stream()
    full = TrainBatches(data, 32, 4, seed=1)
    it = iter(full)
    expected = [next(it)[1] for _ in range(6)]
    first = TrainBatches(data, 32, 4, seed=1)
    it = iter(first)
    got = [next(it)[1] for _ in range(3)]
    resumed = TrainBatches(data, 32, 4, seed=1)
    resumed.load_state_dict(first.state_dict())
    it = iter(resumed)
    got += [next(it)[1] for _ in range(3)]
    assert all(np.array_equal(e, g) for e, g in zip(expected, got))
    with pytest.raises(ValueError, match="seed"):
        TrainBatches(data, 32, 4, seed=2).load_state_dict(first.state_dict())


@pytest.mark.parametrize("images", [False, True])
def test_ranks_get_disjoint_slices_of_the_global_batch(images):
    data = stream(48 * 12)
    kw = dict(example_length=48) if images else {}
    whole = TrainBatches(data, 48, 6, seed=0, **kw).batch(2)
    parts = [TrainBatches(data, 48, 6, seed=0, rank=r, world_size=3, **kw).batch(2) for r in range(3)]
    assert np.array_equal(np.concatenate(parts), whole)
    with pytest.raises(ValueError, match="divisible"):
        TrainBatches(data, 48, 6, world_size=4)


def test_image_epochs_visit_every_example_once():
    examples = np.repeat(np.arange(10, dtype=np.uint8), 12)  # example i is twelve bytes of value i
    batches = TrainBatches(examples, 12, batch_size=3, seed=0, example_length=12)
    assert batches.steps_per_epoch == 3
    seen = np.concatenate([batches.batch(s) for s in range(3)])
    assert np.all(seen == seen[:, :1])  # whole examples, never cut
    assert len(set(seen[:, 0].tolist())) == 9
    assert not np.array_equal(seen, np.concatenate([batches.batch(s) for s in range(3, 6)]))  # new order
    with pytest.raises(ValueError, match="example length"):
        TrainBatches(examples, 10, 3, example_length=12)


@pytest.mark.parametrize("length,context,stride", [(1000, 64, 16), (1000, 64, None), (50, 64, 8), (64, 64, 5)])
def test_eval_windows_score_every_byte_once_with_most_context(length, context, stride):
    windows = eval_windows(length, context, stride)
    scored = np.zeros(length, dtype=int)
    n = min(context, length)
    for w in windows:
        assert 0 <= w.start and w.start + n <= length
        scored[w.start + w.first:w.start + n] += 1
        if w.start > 0:  # later windows: every scored byte keeps >= n - stride bytes of context
            assert w.first >= n - (stride or n // 2)
    assert np.all(scored == 1)


def test_eval_windows_bounded_and_images():
    windows = eval_windows(100_000, 64, 32, max_bytes=1000)
    last = windows[-1]
    assert last.start + 64 == 1000
    images = eval_windows(48 * 5, 48, example_length=48, max_bytes=100)
    assert [(w.start, w.first) for w in images] == [(0, 0), (48, 0)]
    with pytest.raises(ValueError, match="context must be 192, got 48"):  # used to score 48 of every 192 bytes
        eval_windows(192 * 5, 48, example_length=192)
    data = stream(300)
    tokens, first = next(eval_batches(data, eval_windows(300, 64, 16), 64, batch_size=4))
    assert tokens.shape == (4, 64) and first.tolist() == [0, 48, 48, 48]
    assert np.array_equal(tokens[1], data[16:80])


def test_prefetcher_keeps_order_and_forwards_errors():
    data = stream()
    batches = TrainBatches(data, 32, 4, seed=0)
    pre = Prefetcher(iter(batches), depth=2, pin=False)
    for expected_step in range(5):
        step, tensor = next(pre)
        assert step == expected_step and np.array_equal(tensor.numpy(), batches.batch(step))
    pre.close()

    def broken():
        yield 0, data[:4]
        raise OSError("disk gone")

    pre = Prefetcher(broken(), pin=False)
    next(pre)
    with pytest.raises(OSError, match="disk gone"):
        next(pre)


def test_eval_windows_reject_a_stride_below_one():
    for stride in (0, -4):  # -4 used to loop forever
        with pytest.raises(ValueError, match=f"eval stride must be >= 1 or None .*got {stride}"):
            eval_windows(1000, 64, stride)
