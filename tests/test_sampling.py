"""The training stream sampler: endless seeded permutations, continued exactly after any number of batches."""

from __future__ import annotations

import itertools

from lesion_kd.data.sampling import StreamSampler, mix_seed


def take(sampler: StreamSampler, iterations: int) -> list[tuple[int, int]]:
    return list(itertools.chain.from_iterable(iter(sampler) for _ in range(iterations)))


def test_stream_is_a_sequence_of_permutations_with_per_position_seeds():
    s = StreamSampler(10, 4, seed=0, name="labeled", batches_done=lambda: 0)
    assert len(s) == 8  # floor(10 / 4) * 4, as drop_last
    items = take(s, 5)  # 40 elements = 4 full permutations
    for k in range(4):
        assert sorted(i for i, _ in items[10 * k:10 * (k + 1)]) == list(range(10))
    assert [i for i, _ in items[:10]] != [i for i, _ in items[10:20]]  # reshuffled
    assert len({seed for _, seed in items}) == 40  # every position its own augmentation seed


def test_restarts_continue_the_stream_and_a_new_sampler_resumes_at_the_batches_done():
    a = StreamSampler(10, 4, seed=3, name="unlabeled", batches_done=lambda: 0)
    straight = take(a, 3)  # 24 elements = 6 batches
    done = 4  # a run resumed after 4 batches continues at element 16
    b = StreamSampler(10, 4, seed=3, name="unlabeled", batches_done=lambda: done)
    assert take(b, 1) == straight[16:24]


def test_new_epoch_repositions_at_the_batches_done_but_the_same_epoch_does_not():
    done = [0]
    s = StreamSampler(10, 2, seed=0, name="labeled", batches_done=lambda: done[0])
    first = list(iter(s))  # 10 elements: positions 0..9
    done[0] = 3  # the epoch was cut after 3 batches (another loader is longer)
    s.set_epoch(0)
    assert list(iter(s))[:2] == take(StreamSampler(10, 2, 0, "labeled", lambda: 5), 1)[:2]  # continued at 10
    s.set_epoch(1)  # a new epoch: position = 3 batches x 2
    assert list(iter(s)) == take(StreamSampler(10, 2, 0, "labeled", lambda: 3), 1)
    assert first == take(StreamSampler(10, 2, 0, "labeled", lambda: 0), 1)


def test_ddp_ranks_share_one_stream_without_overlap():
    ranks = [StreamSampler(12, 3, seed=1, name="labeled", batches_done=lambda: 0, num_replicas=2, rank=r) for r in (0, 1)]
    single = StreamSampler(12, 3, seed=1, name="labeled", batches_done=lambda: 0)
    r0, r1 = list(iter(ranks[0])), list(iter(ranks[1]))
    assert len(r0) == len(r1) == 6
    assert sorted(r0 + r1) == sorted(list(iter(single)))  # together: the first 12 elements of the stream
    assert not {i for i, _ in r0} & {i for i, _ in r1}


def test_seeds_are_stable_and_distinct():
    assert mix_seed(0, "labeled", 5) == mix_seed(0, "labeled", 5)
    assert len({mix_seed(s, n, p) for s in (0, 1) for n in ("labeled", "unlabeled") for p in range(50)}) == 200
