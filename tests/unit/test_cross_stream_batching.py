"""Cross-stream batching: requests of different streams in one forward pass get the same
outputs and the same next states as when processed alone."""

import asyncio

import pytest
import torch

from ttaserve.adapters.moments import Segments
from ttaserve.adapters.policy import BatchObservation
from ttaserve.adapters.registry import build_policy
from ttaserve.server.batcher import CrossStreamBatcher, PredictJob
from ttaserve.server.dataplane import DataPlane
from ttaserve.server.errors import OverloadedError
from ttaserve.server.metrics import ServerMetrics
from ttaserve.server.model_runner import ModelRunner
from ttaserve.server.state import StreamState, decode_state, encode_state
from ttaserve.server.stores.base import StoredRecord
from ttaserve.server.stores.memory import InMemoryStateStore

STREAMS = {"a": (3, 0.0, 1.0), "b": (1, 1.5, 0.4), "c": (5, -0.5, 2.0)}


def _pixels(name, step):
    n, shift, scale = STREAMS[name]
    g = torch.Generator().manual_seed(hash((name, step)) % 2**31)
    return torch.randn(n, 3, 32, 32, generator=g) * scale + shift


async def _run(runner, policy, together: bool):
    dataplane = DataPlane(runner, InMemoryStateStore(), ServerMetrics(), policy)
    outputs = {}
    for step in range(3):  # states evolve over several batches
        jobs = [PredictJob(stream_id=s, requested_policy=None, pixels=_pixels(s, step)) for s in STREAMS]  # fmt: skip
        if together:
            await dataplane.process_batch(jobs)
        else:
            for job in jobs:
                await dataplane.process_batch([job])
        for job in jobs:
            outputs[(job.stream_id, step)] = [p.top_k for p in job.future.result().predictions]
    records = await dataplane.store.get_many([dataplane.key(s) for s in STREAMS])
    fingerprint = runner.model.card.fingerprint
    states = {s: decode_state(r.data, fingerprint) for s, r in zip(STREAMS, records, strict=True)}
    dataplane.close()
    return outputs, states


@pytest.mark.parametrize("policy", ["bn", "default", "unmix", "tent"])
def test_batched_together_equals_alone(random_model, policy):
    runner = ModelRunner(random_model)
    together_out, together_states = asyncio.run(_run(runner, policy, together=True))
    alone_out, alone_states = asyncio.run(_run(runner, policy, together=False))
    for key, preds in together_out.items():
        for got, want in zip(preds, alone_out[key], strict=True):
            assert [c["label"] for c in got] == [c["label"] for c in want]
            for g, w in zip(got, want, strict=True):
                assert abs(g["score"] - w["score"]) <= 1e-5
    for stream, state in together_states.items():
        other = alone_states[stream]
        assert state.samples_seen == other.samples_seen == 3 * STREAMS[stream][0]
        for name, tensor in state.tensors.items():
            torch.testing.assert_close(tensor, other.tensors[name], atol=1e-5, rtol=1e-5)


def test_same_stream_requests_in_one_batch_apply_in_arrival_order(random_model):
    runner = ModelRunner(random_model)

    async def run():
        dataplane = DataPlane(runner, InMemoryStateStore(), ServerMetrics(), "bn")
        jobs = [PredictJob(stream_id="s", requested_policy=None, pixels=_pixels("a", i)) for i in range(3)]  # fmt: skip
        await dataplane.process_batch(jobs)
        results = [j.future.result() for j in jobs]
        (record,) = await dataplane.store.get_many([dataplane.key("s")])
        dataplane.close()
        return results, decode_state(record.data, runner.model.card.fingerprint)

    results, state = asyncio.run(run())
    assert state.samples_seen == 9
    assert state.updates == 3
    assert state.version == 1  # one write for the whole batch
    assert {r.state_version for r in results} == {1}


def test_bounded_queue_rejects_with_overloaded():
    async def run():
        release = asyncio.Event()

        async def slow_handler(jobs):
            await release.wait()
            for job in jobs:
                job.future.set_result("ok")

        batcher = CrossStreamBatcher(slow_handler, max_batch_images=4, max_wait_s=0.0, max_queue_images=6)  # fmt: skip
        batcher.start()
        first = asyncio.create_task(batcher.submit(PredictJob("a", None, torch.zeros(4, 3, 2, 2))))
        await asyncio.sleep(0.01)
        second = asyncio.create_task(batcher.submit(PredictJob("b", None, torch.zeros(2, 3, 2, 2))))  # fmt: skip
        await asyncio.sleep(0.01)
        with pytest.raises(OverloadedError):
            await batcher.submit(PredictJob("c", None, torch.zeros(1, 3, 2, 2)))
        release.set()
        assert await first == "ok"
        assert await second == "ok"
        await batcher.stop()

    asyncio.run(run())


def _recording_batcher(max_wait_s, max_gather_s, sizes):
    async def handler(jobs):
        sizes.append([job.stream_id for job in jobs])
        await asyncio.sleep(0.005)  # a forward pass: jobs queue up meanwhile
        for job in jobs:
            job.future.set_result("ok")

    return CrossStreamBatcher(handler, max_batch_images=64, max_wait_s=max_wait_s, max_queue_images=256, max_gather_s=max_gather_s)  # fmt: skip


def test_lone_stream_is_not_delayed_by_the_batch_wait():
    async def run():
        batches = []
        batcher = _recording_batcher(max_wait_s=0.5, max_gather_s=0.5, sizes=batches)
        batcher.start()
        loop = asyncio.get_running_loop()
        started = loop.time()
        for _ in range(5):  # one request at a time, like a single closed-loop client
            await batcher.submit(PredictJob("solo", None, torch.zeros(1, 3, 2, 2)))
        elapsed = loop.time() - started
        await batcher.stop()
        return batches, elapsed

    batches, elapsed = asyncio.run(run())
    assert batches == [["solo"]] * 5
    assert elapsed < 0.25  # far below one 0.5 s wait


def test_active_streams_are_gathered_into_one_batch_and_the_gathering_is_bounded():
    async def run():
        batches = []
        batcher = _recording_batcher(max_wait_s=0.001, max_gather_s=0.3, sizes=batches)
        batcher.start()

        async def client(name, delay):  # closed loop: the next request after the answer
            for _ in range(3):
                await asyncio.sleep(delay)
                await batcher.submit(PredictJob(name, None, torch.zeros(1, 3, 2, 2)))

        # 4 streams whose requests arrive a few ms apart (as when HTTP parsing is the bound)
        await asyncio.gather(*(client(f"s{i}", 0.004 * i) for i in range(4)))
        await batcher.stop()
        return batches

    batches = asyncio.run(run())
    assert sum(len(b) for b in batches) == 12
    # once every stream is known as active, its requests meet in one batch
    assert any(sorted(b) == ["s0", "s1", "s2", "s3"] for b in batches[1:])


def test_gathering_stops_when_an_active_stream_stops_sending():
    async def run():
        batches = []
        batcher = _recording_batcher(max_wait_s=0.001, max_gather_s=0.2, sizes=batches)
        batcher.start()
        await asyncio.gather(*(batcher.submit(PredictJob(s, None, torch.zeros(1, 3, 2, 2))) for s in ("a", "b")))  # fmt: skip
        await asyncio.gather(*(batcher.submit(PredictJob(s, None, torch.zeros(1, 3, 2, 2))) for s in ("a", "b")))  # fmt: skip
        loop = asyncio.get_running_loop()
        started = loop.time()
        await batcher.submit(PredictJob("a", None, torch.zeros(1, 3, 2, 2)))  # b went quiet
        waited = loop.time() - started
        await batcher.stop()
        return waited

    assert asyncio.run(run()) < 0.15  # the idle timeout ends the wait well before the cap


@pytest.mark.parametrize("policy", ["bn", "default"])
def test_rounds_of_one_batch_equal_updates_applied_one_by_one(random_model, policy):
    """Stream a sends twice and b once in one batch (a, b, a): a's second update starts
    from its first, each from that request's own rows of the one forward pass."""
    runner = ModelRunner(random_model)
    arrivals = [("a", _pixels("a", 0)), ("b", _pixels("b", 0)), ("a", _pixels("c", 1))]

    async def run():
        dataplane = DataPlane(runner, InMemoryStateStore(), ServerMetrics(), policy)
        jobs = [PredictJob(stream_id=s, requested_policy=None, pixels=x) for s, x in arrivals]
        await dataplane.process_batch(jobs)
        records = await dataplane.store.get_many([dataplane.key("a"), dataplane.key("b")])
        dataplane.close()
        return [decode_state(r.data, runner.model.card.fingerprint) for r in records]

    got_a, got_b = asyncio.run(run())
    chosen = build_policy(policy)
    fresh = chosen.init_state(runner.source)
    sizes = [len(x) for _, x in arrivals]
    result = runner.forward(torch.cat([x for _, x in arrivals]), Segments.from_sizes(sizes), chosen, [fresh] * 3)  # fmt: skip
    obs = BatchObservation(result.moments, result.probs, result.raw_logits, result.gate.accepted, result.gate.open_set, Segments.from_sizes(sizes))  # fmt: skip
    want_a = chosen.update(chosen.update(fresh, obs.request(0), runner.source).state, obs.request(2), runner.source).state  # fmt: skip
    want_b = chosen.update(fresh, obs.request(1), runner.source).state
    for got, want in ((got_a, want_a), (got_b, want_b)):
        for name, tensor in want.items():
            torch.testing.assert_close(got.tensors[name], tensor, atol=1e-5, rtol=1e-4)
    assert (got_a.samples_seen, got_a.updates, got_b.samples_seen) == (sizes[0] + sizes[2], 2, sizes[1])  # fmt: skip


def test_stored_state_with_another_tensor_layout_starts_fresh(random_model):
    """A record of a known policy whose tensors do not match it (written by another
    version) is discarded and counted, never stacked with the others."""
    runner = ModelRunner(random_model)

    async def run():
        dataplane = DataPlane(runner, InMemoryStateStore(), ServerMetrics(), "bn")
        odd = StreamState.of("bn", {}, runner.model.card.fingerprint, {"bn.0.mean": torch.zeros(3)}, version=1)  # fmt: skip
        await dataplane.store.compare_and_set(dataplane.key("old"), 0, StoredRecord(1, encode_state(odd)))  # fmt: skip
        jobs = [PredictJob(stream_id=s, requested_policy=None, pixels=_pixels("a", 0)) for s in ("old", "new")]  # fmt: skip
        await dataplane.process_batch(jobs)
        (record,) = await dataplane.store.get_many([dataplane.key("old")])
        discarded = dataplane.metrics.registry.get_sample_value("ttaserve_state_discarded_total")
        dataplane.close()
        return decode_state(record.data, runner.model.card.fingerprint), discarded, jobs

    state, discarded, jobs = asyncio.run(run())
    assert discarded == 1
    assert all(j.future.result().predictions for j in jobs)
    assert (state.version, state.samples_seen) == (2, 3)
    assert state.packed.layout == StreamState.of("bn", {}, "", build_policy("bn").init_state(runner.source)).packed.layout  # fmt: skip


def test_warm_up_and_forward_passes_run_in_the_forward_thread_with_its_thread_count(random_model):
    """The forward thread is the only one that should run parallel torch operations (see
    `create_app`): the warm-up runs there, with the intra-op threads it was given."""
    import threading

    runner = ModelRunner(random_model)
    seen: list[tuple[str, int]] = []
    forward = runner.forward

    def recording_forward(*args, **kwargs):
        seen.append((threading.current_thread().name, torch.get_num_threads()))
        return forward(*args, **kwargs)

    runner.forward = recording_forward  # type: ignore[method-assign]
    dataplane = DataPlane(runner, InMemoryStateStore(), ServerMetrics(), "bn", forward_threads=1)

    async def main() -> None:
        await dataplane.warm_up("default", torch.zeros(1, 3, 32, 32))
        await dataplane.process_batch([PredictJob("s", None, torch.rand(2, 3, 32, 32))])

    try:
        asyncio.run(main())
    finally:
        dataplane.close()
    assert len(seen) == 2
    for name, threads in seen:
        assert name.startswith("ttaserve-forward") and threads == 1
    assert threading.current_thread().name == "MainThread"


class _HeldWritesStore(InMemoryStateStore):
    """The in-process store whose writes wait until the test lets them through."""

    def __init__(self) -> None:
        super().__init__()
        self.open = asyncio.Event()

    async def compare_and_set(self, key, expected_version, record):
        await self.open.wait()
        return await super().compare_and_set(key, expected_version, record)


def test_next_batch_runs_while_writes_are_in_flight_and_a_stream_waits_for_its_own(random_model):  # fmt: skip
    """Pipelined batches: while batch 1's write (stream a) is held, batch 2 (stream b) is
    read and forwarded; batch 3 (stream a again) waits for batch 1's write, so it starts
    from a's updated state. Answers come only after their batch's write."""
    runner = ModelRunner(random_model)

    async def run():
        store = _HeldWritesStore()
        dataplane = DataPlane(runner, store, ServerMetrics(), "bn", writes_in_flight=4)
        first = [PredictJob("a", None, _pixels("a", 0))]
        second = [PredictJob("b", None, _pixels("b", 0))]
        third = [PredictJob("a", None, _pixels("a", 1))]
        # (serial batches would wait here for the held write: a timeout, not a hang)
        written_1 = await asyncio.wait_for(dataplane.begin_batch(first), 30)
        written_2 = await asyncio.wait_for(dataplane.begin_batch(second), 30)  # while 1 writes
        overlapped = not written_1.done() and not first[0].future.done()
        reading_3 = asyncio.create_task(dataplane.begin_batch(third))
        await asyncio.sleep(0.05)
        waited = not reading_3.done()  # a's second read waits for a's first write
        store.open.set()
        await (await reading_3)
        await asyncio.gather(written_1, written_2)
        await dataplane.flush()
        dataplane.close()
        return overlapped, waited, [j.future.result() for j in first + second + third]

    overlapped, waited, (a1, b1, a2) = asyncio.run(run())
    assert overlapped and waited
    assert (a1.samples_seen, a1.state_version, b1.samples_seen) == (3, 1, 1)
    assert (a2.samples_seen, a2.state_version) == (6, 2)


def test_writes_in_flight_zero_writes_and_answers_before_the_next_batch(random_model):
    runner = ModelRunner(random_model)

    async def run():
        store = _HeldWritesStore()
        dataplane = DataPlane(runner, store, ServerMetrics(), "bn", writes_in_flight=0)
        job = PredictJob("a", None, _pixels("a", 0))
        beginning = asyncio.create_task(dataplane.begin_batch([job]))
        await asyncio.sleep(0.05)
        held = not beginning.done()  # the write is held, so the batch has not handed over
        store.open.set()
        await (await beginning)
        dataplane.close()
        return held, job.future.done()

    assert asyncio.run(run()) == (True, True)


@pytest.mark.parametrize(("jobs", "batches_while_held"), [(3, 1), (5, 2)])
def test_next_batch_starts_before_the_last_stage_only_when_a_full_batch_is_queued(jobs, batches_while_held):  # fmt: skip
    """2 images per batch. Three jobs: the third waits for the first batch's last stage (its
    answer lets that stream join the next batch). Five: a full batch is queued behind
    the first, so it runs while the first batch's last stage is held."""

    async def run():
        held = asyncio.Event()
        handled: list[int] = []

        async def handler(batch):
            handled.append(len(batch))
            for job in batch:
                job.future.set_result(None)
            return asyncio.ensure_future(held.wait())

        batcher = CrossStreamBatcher(handler, max_batch_images=2, max_wait_s=0.0, max_queue_images=64)  # fmt: skip
        batcher.start()
        waiting = [asyncio.ensure_future(batcher.submit(PredictJob(f"s{i}", None, torch.zeros(1, 3, 2, 2)))) for i in range(jobs)]  # fmt: skip
        for _ in range(500):  # until the batches expected while held ran (slow machines)
            if len(handled) >= batches_while_held:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)  # and no more than those
        before = len(handled)
        held.set()
        await asyncio.gather(*waiting)
        await batcher.stop()
        return before, sum(handled)

    assert asyncio.run(run()) == (batches_while_held, jobs)


def test_stopping_the_batcher_does_not_cancel_a_batch_last_stage():
    """Graceful shutdown stops the batcher, then flushes the dataplane's writes: stopping
    must leave a write the batcher was waiting for running."""

    async def run():
        held = asyncio.Event()
        stages: list[asyncio.Task] = []

        async def handler(batch):
            for job in batch:
                job.future.set_result(None)
            stages.append(asyncio.ensure_future(held.wait()))
            return stages[-1]

        batcher = CrossStreamBatcher(handler, max_batch_images=4, max_wait_s=0.0, max_queue_images=64)  # fmt: skip
        batcher.start()
        await batcher.submit(PredictJob("s", None, torch.zeros(1, 3, 2, 2)))
        await asyncio.sleep(0.05)  # the batcher now waits for the held stage
        await batcher.stop()
        cancelled = stages[0].cancelled()
        held.set()
        await stages[0]
        return cancelled

    assert asyncio.run(run()) is False
