"""The actor's byte budget for decoded images and its shape batching (pure parts, no Ray, no model)."""

import threading
import time

import pytest

from pipeline.segment.batching import ShapeBatcher, padded_ratio
from pipeline.segment.memory import ImageMemory, Stopped
from pipeline.segment.settings import IMAGE_MEMORY_MAX, IMAGE_MEMORY_MIN, image_memory_for


def test_a_read_waits_while_the_budget_is_spent_and_goes_on_when_it_is_released():
    memory = ImageMemory(100)
    unit = memory.unit()
    unit.reserve(0, 80)
    done = threading.Event()
    threading.Thread(target=lambda: (unit.reserve(2, 50), done.set()), daemon=True).start()
    assert not done.wait(0.3)  # 80 + 50 > 100, and input 2 is not the one the consumer waits for
    unit.release(80)
    assert done.wait(2)
    assert memory.held == 50 and memory.peak == 80


def test_the_input_the_consumer_waits_for_is_always_admitted():
    # Inputs 0 and 1 wait in a batch for input 2: input 2 must not wait for them, or the unit deadlocks.
    memory = ImageMemory(100)
    unit = memory.unit()
    unit.reserve(0, 60)
    unit.reserve(1, 40)
    unit.consumed(1)
    unit.reserve(2, 60)  # would block if it were not the head of the line
    assert memory.held == 160


def test_a_unit_that_ends_returns_all_it_holds_and_stops_its_waiting_reads():
    memory = ImageMemory(100)
    with memory.unit() as unit:
        unit.reserve(0, 90)
        errors = []

        def late():
            try:
                unit.reserve(5, 50)
            except Stopped as e:
                errors.append(e)

        t = threading.Thread(target=late, daemon=True)
        t.start()
        time.sleep(0.2)
    t.join(2)
    assert errors and memory.held == 0


def test_the_default_budget_is_an_eighth_of_memory_per_actor_within_bounds():
    assert image_memory_for(512, None) == 512 << 20
    assert image_memory_for(None, 8 << 30) == 1 << 30
    assert image_memory_for(None, 1 << 30) == IMAGE_MEMORY_MIN
    assert image_memory_for(None, 1 << 40) == IMAGE_MEMORY_MAX
    assert image_memory_for(None, None) == IMAGE_MEMORY_MAX


class Img:
    def __init__(self, i, h, w):
        self.index, self.height, self.width = i, h, w


def batches_of(sizes, batch_size):
    batcher = ShapeBatcher(batch_size)
    out = []
    for i, (h, w) in enumerate(sizes):
        out += batcher.add(Img(i, h, w))
    return out + batcher.flush()


def test_batches_are_of_one_orientation_and_every_image_goes_out_once():
    sizes = [(3000, 4000), (4000, 3000)] * 10 + [(480, 640)] * 3
    batches = batches_of(sizes, 4)
    assert sorted(i.index for b in batches for i in b) == list(range(len(sizes)))
    assert all(len({i.height >= i.width for i in b}) == 1 for b in batches)
    assert all(len(b) <= 4 for b in batches)


def test_a_rare_orientation_does_not_wait_for_ever():
    # One portrait among landscapes leaves with a partial batch once the window is passed, not at the unit's end.
    sizes = [(4000, 3000)] + [(3000, 4000)] * 20
    batcher = ShapeBatcher(4)
    emitted_at = None
    for i, (h, w) in enumerate(sizes):
        for b in batcher.add(Img(i, h, w)):
            if any(x.index == 0 for x in b):
                emitted_at = i
    assert emitted_at is not None and emitted_at <= 2 * 4 + 1


@pytest.mark.parametrize("batch_size", [4])
def test_padding_of_a_50_50_orientation_mix_is_under_5_percent_when_grouped(batch_size):
    sizes = [(3000, 4000), (4000, 3000)] * 32
    arrival = [[s for s in sizes[k : k + batch_size]] for k in range(0, len(sizes), batch_size)]
    grouped = [[(i.height, i.width) for i in b] for b in batches_of(sizes, batch_size)]
    naive = padded_ratio(arrival, min_size=800, max_size=1333)
    ours = padded_ratio(grouped, min_size=800, max_size=1333)
    assert naive > 1.3 and ours <= 1.05


def test_memory_per_actor_counts_only_the_nodes_that_hold_actors():
    from pipeline.segment.resources import Resources, memory_per_actor

    gpu = Resources("cuda", 1, 8, 1.0, 1.0, 1, 0.25)
    nodes = [
        {"CPU": 0, "memory": 8 << 30},  # the head: no actor
        {"CPU": 16, "memory": 64 << 30},  # a CPU node of a GPU pool: no actor
        {"CPU": 48, "GPU": 4, "memory": 160 << 30},
        {"CPU": 48, "GPU": 8, "memory": 160 << 30},
    ]
    assert memory_per_actor(gpu, nodes) == (160 << 30) / 8
    cpu = Resources("cpu", 1, 2, 0.0, 7.0, 8, 0.25)
    assert memory_per_actor(cpu, [{"CPU": 8, "memory": 16 << 30}]) == 16 << 30
    assert memory_per_actor(cpu, [{"CPU": 8}]) is None
