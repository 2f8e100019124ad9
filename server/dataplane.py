"""The dataplane: per-stream state around shared forward passes.

For each batch: read every stream's state in one round trip, run one forward pass per
policy present, answer each request, and write each stream's next state with
compare-and-set. A conflict (another replica or request wrote first) re-reads the state
and re-applies the same update from the recorded moments: no second forward, and the
answer already computed stays valid. Requests of one stream that meet in one batch are
normalized with the same (pre-batch) state; their updates are applied in arrival order.
Updates are batched: the policy's `update_batch` moves every stream of a forward pass at
once (one round per request a stream has in the batch, usually one).

With `writes_in_flight` > 0 batches are pipelined: a batch's writes (and answers, which
follow them) can still be in flight while the next batch is read and forwarded, so store
round trips overlap with the model instead of idling it; a stream's next read waits for
its previous write.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from ttaserve.adapters.moments import Segments
from ttaserve.adapters.policy import AdaptationPolicy, BatchObservation
from ttaserve.adapters.registry import POLICIES, build_policy
from ttaserve.server.batcher import PredictJob
from ttaserve.server.compiled_forward import CompiledForward, compiled_graph_count, warm_up_sizes
from ttaserve.server.drift import DriftTracker, GroupLabels
from ttaserve.server.errors import ApiError
from ttaserve.server.metrics import ServerMetrics
from ttaserve.server.model_runner import ForwardResult, ModelRunner, intra_op_threads
from ttaserve.server.state import (
    PackedTensors,
    StateMismatchError,
    StreamState,
    TensorLayout,
    decode_state,
    encode_state,
    finite_rows,
)
from ttaserve.server.stores.base import StateStore, StoredRecord, StoreUnavailableError

log = logging.getLogger(__name__)
# Compare-and-set attempts per write; after a conflict, a random wait of up to
# min(CAS_BACKOFF_CAP_S, CAS_BACKOFF_S * 2**attempt) before re-reading (jittered
# exponential backoff), so that writers of one busy stream on several replicas take turns:
# with immediate retries, 60 concurrent requests of one stream over 3 replicas lost updates
# (8 attempts, no wait).
CAS_ATTEMPTS = 32
CAS_BACKOFF_S = 0.0005
CAS_BACKOFF_CAP_S = 0.02


@dataclass
class ImagePrediction:
    label: int
    class_name: str
    score: float
    top_k: list[dict[str, Any]]
    open_set: bool
    open_set_score: float


@dataclass
class PredictOutcome:
    """What a predict request gets back."""

    predictions: list[ImagePrediction]
    policy: str
    samples_seen: int
    state_version: int
    degraded: bool = False
    reset: bool = False


@dataclass
class _StreamWork:
    """One stream's part of a batch: its state before, its jobs, and where their requests
    sit in the forward pass (re-applied from there on a compare-and-set conflict)."""

    key: str
    state: StreamState
    policy: AdaptationPolicy
    jobs: list[PredictJob] = field(default_factory=list)
    requests: list[int] = field(default_factory=list)  # request indices, in arrival order
    forward: ForwardResult | None = None
    segments: Segments | None = None
    reset_reasons: list[str] = field(default_factory=list)
    answers: dict[int, list[ImagePrediction]] = field(default_factory=dict)
    new_state: StreamState | None = None


class DataPlane:
    """Turns predict jobs into answers and state updates; owns no HTTP."""

    def __init__(
        self,
        runner: ModelRunner,
        store: StateStore,
        metrics: ServerMetrics,
        default_policy: str,
        clock: Callable[[], float] = time.time,
        max_groups: int = 32,
        single_thread_below_images: int = 0,
        forward_threads: int | None = None,
        writes_in_flight: int = 0,
    ) -> None:
        if default_policy not in POLICIES:
            raise ValueError(f"TTASERVE_DEFAULT_POLICY={default_policy!r} is unknown; known: {', '.join(sorted(POLICIES))}")  # fmt: skip
        self.runner = runner
        self.store = store
        self.metrics = metrics
        self.default_policy = default_policy
        self._policies = {name: build_policy(name) for name in POLICIES}
        self._layouts = {name: TensorLayout.of(p.init_state(runner.source)) for name, p in self._policies.items()}  # fmt: skip
        self._clock = clock
        # Batches whose state writes may still be in flight while the next one runs (0: each
        # batch is written and answered before the next is read), and the write each
        # stream's next read waits for.
        self._writes_in_flight = writes_in_flight
        self._writes: set[asyncio.Task[None]] = set()
        self._writing: dict[str, asyncio.Future[None]] = {}
        self._observing: set[asyncio.Future[None]] = set()  # drift observations not yet run
        # Small forward passes run on one intra-op thread: their ops are too small to split,
        # and a second OpenMP thread competes with the event loop for the cores (measured on
        # 2 cores: 16 streams x 1 image 319 -> 419 images/s for `source`; 64 x 32 needs both).
        # That was measured while other threads' OpenMP teams throttled the forward thread
        # (see `create_app`); A/B probes since then are within this machine's noise.
        self._single_thread_below = single_thread_below_images
        self._warmed: set[CompiledForward] = set()  # compiled forwards `warm_up` has run through
        self._uncompiled: set[tuple[int, int]] = set()  # (images, requests) logged as run eager
        self._model_name = runner.model.card.name
        self._fingerprint = runner.model.card.fingerprint
        self.groups = GroupLabels(max_groups)
        self.drift = DriftTracker(metrics, runner.source, runner.model.card.calibration)
        # The forward thread sets its own intra-op thread count (`forward_threads`; None:
        # torch's setting). It should be the only thread with an OpenMP team: see
        # `create_app` in server/app.py.
        self._executor = ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="ttaserve-forward",
            initializer=torch.set_num_threads if forward_threads else None,
            initargs=(forward_threads,) if forward_threads else (),
        )

    async def warm_up(self, policy_name: str, x: torch.Tensor) -> None:
        """Forward passes of fresh `policy_name` states on rows of `x` (decoded images), in
        the forward thread, before readiness, so that first-call costs are paid here and not
        by a request: one 1-image pass, or for a compiled policy one pass per variant the
        compiler specializes on (`warm_up_sizes`), up to as many images as `x` has (give
        it the largest forward pass; a compiled forward that several policies run, the
        frozen model's, once). A compiled forward that fails here (no C++ compiler, say)
        is dropped: the policy runs eager."""
        policy = self._policies[policy_name]
        loop = asyncio.get_running_loop()
        compiled = self.runner.compiled(policy)
        if compiled is not None and compiled not in self._warmed:  # the frozen one serves several
            started = time.perf_counter()
            try:
                for sizes in warm_up_sizes(self._single_thread_below, len(x)):
                    states = [self.fresh_state(policy_name).packed for _ in sizes]
                    await loop.run_in_executor(self._executor, self._compile, x[: sum(sizes)], Segments.from_sizes(list(sizes)), policy, states)  # fmt: skip
                log.info("compiled the forward of policy %s in %.1f s", policy_name, time.perf_counter() - started)  # fmt: skip
                compiled.seal()  # from now on a variant not compiled here runs eager, no stall
                self._warmed.add(compiled)
                return
            except Exception:
                log.exception("compiling the forward of policy %s failed; it runs eager", policy_name)  # fmt: skip
                self.runner.drop_compiled(policy)
        state = self.fresh_state(policy_name)
        await loop.run_in_executor(self._executor, self.runner.forward, x[:1], Segments.from_sizes([1]), policy, [state.packed])  # fmt: skip

    # --- keys and states -------------------------------------------------------------------
    def key(self, stream_id: str) -> str:
        """Store key; the hash tag keeps a stream's keys in one Redis Cluster slot."""
        return f"ttaserve:{self._model_name}:{{{stream_id}}}"

    def policy(self, name: str) -> AdaptationPolicy:
        return self._policies[name]

    def fresh_state(self, policy_name: str, previous: StreamState | None = None) -> StreamState:
        policy = self._policies[policy_name]
        now = self._clock()
        return StreamState.of(
            policy=policy_name,
            policy_params=policy.params(),
            model_fingerprint=self._fingerprint,
            tensors=policy.init_state(self.runner.source),
            version=previous.version if previous else 0,
            resets=previous.resets + 1 if previous else 0,
            created_at=previous.created_at if previous else now,
            updated_at=now,
        )

    def _decode(self, record: StoredRecord | None) -> StreamState | None:
        if record is None:
            return None
        try:
            state = decode_state(record.data, self._fingerprint)
        except StateMismatchError as exc:
            log.warning("discarding unusable stream state: %s", exc)
            self.metrics.state_discarded.inc()
            return self._unusable(record)
        if state.policy not in self._policies:
            return self._unusable(record)
        if state.packed.layout != self._layouts[state.policy]:  # written by another version
            log.warning("discarding a stream state whose tensors do not match policy %r", state.policy)  # fmt: skip
            self.metrics.state_discarded.inc()
            return self._unusable(record)
        return replace(state, version=record.version)

    def _unusable(self, record: StoredRecord) -> StreamState:
        """A placeholder for a stored record that cannot be used: its version, no policy."""
        return StreamState.of("", {}, self._fingerprint, {}, version=record.version)

    async def read_state(self, stream_id: str) -> StreamState | None:
        """The stream's stored state (None if absent or unusable)."""
        with self.metrics.store_latency("get"):
            (record,) = await self.store.get_many([self.key(stream_id)])
        state = self._decode(record)
        return state if state is not None and state.policy else None

    # --- batch processing ------------------------------------------------------------------
    async def process_batch(self, jobs: list[PredictJob]) -> None:
        """Answer every job of a batch; returns when all are answered and written, and its
        metrics observed (for callers outside the batcher: tests, `bench accuracy`)."""
        await (await self.begin_batch(jobs))
        await self.flush()

    async def begin_batch(self, jobs: list[PredictJob]) -> asyncio.Task[None]:
        """The batcher's handler: run a batch's forward passes and state updates, and return
        its write-and-answer stage as a task, so that the next batch's forward pass can run
        while this one's state writes (store round trips) are in flight (the batcher lets
        it when saturated). At most `writes_in_flight` batches write at once (more: wait
        here for the oldest). A stream's state is read only after every earlier batch's
        write of it; its answers follow its write, so a client never sees an answer
        before its update is stored."""
        started = time.perf_counter()
        keys = list(dict.fromkeys(self.key(j.stream_id) for j in jobs))
        earlier = {self._writing[k] for k in keys if k in self._writing}
        written: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        for k in keys:  # before any await: batches take their turn per stream in call order
            self._writing[k] = written
        try:
            if earlier:
                await asyncio.gather(*earlier)
            work, degraded = await self._read_and_forward(jobs, keys, started)
        except BaseException:
            self._release(keys, written)
            raise
        task = asyncio.create_task(self._write_and_answer(jobs, keys, work, degraded, written))
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)
        while len(self._writes) > self._writes_in_flight:
            await asyncio.wait(self._writes, return_when=asyncio.FIRST_COMPLETED)
        return task

    async def flush(self) -> None:
        """Wait for every batch's state writes and metric observations in flight."""
        while self._writes or self._observing:
            await asyncio.wait(self._writes | self._observing)

    def _observed(self, future: asyncio.Future[None]) -> None:
        self._observing.discard(future)
        if not future.cancelled() and future.exception() is not None:
            log.error("observing a batch's drift failed", exc_info=future.exception())

    def _release(self, keys: list[str], written: asyncio.Future[None]) -> None:
        written.set_result(None)
        for k in keys:
            if self._writing.get(k) is written:
                del self._writing[k]

    async def _read_and_forward(self, jobs: list[PredictJob], keys: list[str], started: float) -> tuple[dict[str, _StreamWork], bool]:  # fmt: skip
        for job in jobs:
            self.metrics.queue_wait.observe(started - job.enqueued_at)
        degraded = False
        try:
            with self.metrics.store_latency("get"):
                records = await self.store.get_many(keys)
        except StoreUnavailableError:
            degraded, records = True, [None] * len(keys)
            self.metrics.store_errors.labels(operation="get").inc()
        stored = {k: self._decode(r) for k, r in zip(keys, records, strict=True)}
        work: dict[str, _StreamWork] = {}
        for job in jobs:
            self._assign(job, stored, work)
        await self._run_forward_passes(list(work.values()))
        self.metrics.batch_images.observe(sum(j.size for j in jobs))
        self.metrics.batch_requests.observe(len(jobs))
        return work, degraded

    async def _write_and_answer(self, jobs: list[PredictJob], keys: list[str], work: dict[str, _StreamWork], degraded: bool, written: asyncio.Future[None]) -> None:  # fmt: skip
        try:
            # Streams' writes are independent (one key each): their round trips overlap.
            committing = [w for w in work.values() if w.jobs]
            await asyncio.gather(*(self._commit(w, degraded) for w in committing))
            for w in committing:
                for reason in w.reset_reasons:
                    self.metrics.resets.labels(reason=reason).inc()
            if degraded:
                self.metrics.degraded.inc(len(jobs))
        except Exception as exc:  # a defect: answer every job still waiting
            log.exception("writing a batch's states failed")
            error = ApiError("internal_error", f"state write failed: {exc}", 500)
            for job in jobs:
                if not job.future.done():
                    job.future.set_exception(error)
        finally:
            self._release(keys, written)

    async def _run_forward_passes(self, work: list[_StreamWork]) -> None:
        """One forward pass per policy present; a failed pass answers its jobs with 500."""
        by_policy: dict[str, list[_StreamWork]] = {}
        for w in work:
            if w.jobs:
                by_policy.setdefault(w.policy.name, []).append(w)
        loop = asyncio.get_running_loop()
        for group in by_policy.values():
            try:
                observe = await loop.run_in_executor(self._executor, self._forward_and_update, group)  # fmt: skip
            except Exception as exc:
                log.exception("forward pass failed")
                error = ApiError("inference_failed", f"inference failed: {exc}", 500)
                for w in group:
                    for job in w.jobs:
                        if not job.future.done():
                            job.future.set_exception(error)
                    w.new_state, w.jobs = None, []
            else:  # metrics only: in the forward thread beside this batch's writes, not before them
                observing = loop.run_in_executor(self._executor, observe)
                self._observing.add(observing)
                observing.add_done_callback(self._observed)

    def _assign(self, job: PredictJob, stored: dict[str, StreamState | None], work: dict[str, _StreamWork]) -> None:  # fmt: skip
        key = self.key(job.stream_id)
        if key not in work:
            state = stored[key]
            if state is None or not state.policy:
                state = self.fresh_state(job.requested_policy or self.default_policy)
                state = replace(state, version=stored[key].version if stored[key] else 0, resets=0)
            work[key] = _StreamWork(key, state, self._policies[state.policy])
        w = work[key]
        if job.requested_policy and job.requested_policy != w.state.policy:
            job.future.set_exception(ApiError(
                "policy_conflict",
                f"stream {job.stream_id!r} uses policy {w.state.policy!r}; reset it with "
                f"?policy={job.requested_policy} to change",
                409,
            ))  # fmt: skip
            return
        w.jobs.append(job)

    def _forward_and_update(self, group: list[_StreamWork]) -> Callable[[], None]:
        """Runs in the forward thread: one forward pass for all jobs of one policy, and the
        streams' next states. Returns its drift observation, to run after it."""
        policy = group[0].policy
        order = sorted(((w, job) for w in group for job in w.jobs), key=lambda p: p[1].enqueued_at)
        sizes = [job.size for _, job in order]
        x = torch.cat([job.pixels for _, job in order])
        segments = Segments.from_sizes(sizes)
        compiled = self.runner.compiled(policy) is not None
        graphs = compiled_graph_count() if compiled else 0
        eager = self.runner.eager_fallbacks() if compiled else 0
        started = time.perf_counter()
        result = self._forward(x, segments, policy, [w.state.packed for w, _ in order])
        self.metrics.forward_seconds.observe(time.perf_counter() - started)
        if compiled:
            self._note_uncompiled(compiled_graph_count() - graphs, self.runner.eager_fallbacks() - eager, len(x), len(sizes))  # fmt: skip
        answers = self._predictions(result, sizes, [job.top_k for _, job in order])
        for r, (w, job) in enumerate(order):
            w.answers[id(job)] = answers[r]
            w.requests.append(r)
        for w in group:
            w.forward, w.segments = result, segments
        for w, (new, reasons) in zip(group, self._apply(group, [w.state for w in group]), strict=True):  # fmt: skip
            w.new_state, w.reset_reasons = new, reasons
        labels = [self.groups.label(job.group) for _, job in order]
        return functools.partial(self._observe_drift, labels, sizes, result)

    def _observe_drift(self, labels: list[str], sizes: list[int], result: ForwardResult) -> None:
        """A forward pass's per-group metrics and drift signals (in the forward thread)."""
        self._observe_groups(labels, sizes, result)
        # drift of the states as this batch found them: one computation for all streams
        self.drift.observe_states(labels, result.states)

    def _note_uncompiled(self, new_graphs: int, eager_runs: int, images: int, requests: int) -> None:  # fmt: skip
        """Count and log a batch variant the warm-up did not compile: compiled on the spot
        (a forward not sealed: the thread stalled) or run eager (sealed: slower)."""
        if new_graphs:
            self.metrics.compilations.inc(new_graphs)
            log.warning("compiled %d graph(s) for a batch of %d images in %d requests: the warm-up did not meet this variant", new_graphs, images, requests)  # fmt: skip
        if eager_runs:
            self.metrics.eager_fallbacks.inc(eager_runs)
            variant = (images, requests)
            if variant not in self._uncompiled and len(self._uncompiled) < 64:  # once each
                self._uncompiled.add(variant)
                log.warning("a batch of %d images in %d requests ran eager: the warm-up did not compile this variant", images, requests)  # fmt: skip

    def _forward(self, x: torch.Tensor, segments: Segments, policy: AdaptationPolicy, states: list[PackedTensors]) -> ForwardResult:  # fmt: skip
        """The runner's forward, on one intra-op thread below `single_thread_below_images`."""
        with intra_op_threads(1 if len(x) < self._single_thread_below else None):
            return self.runner.forward(x, segments, policy, states)

    def _compile(self, x: torch.Tensor, segments: Segments, policy: AdaptationPolicy, states: list[PackedTensors]) -> ForwardResult:  # fmt: skip
        """`_forward`, compiling with the thread count it runs on written into inductor's
        configuration: its kernels fix their thread count at compile time, and the setting
        is part of its cache key, so graphs for one and for two threads stay apart."""
        threads = 1 if len(x) < self._single_thread_below else torch.get_num_threads()
        with torch._inductor.config.patch({"cpp.threads": threads}):
            return self._forward(x, segments, policy, states)

    def _apply(self, works: list[_StreamWork], states: list[StreamState]) -> list[tuple[StreamState, list[str]]]:  # fmt: skip
        """Pure: each stream's state (`states[i]` for `works[i]`, all of one forward pass)
        after its requests' updates in arrival order, with its reset reasons. All streams
        move at once, one round per request a stream has in the batch; re-run for one
        stream after a compare-and-set conflict."""
        policy, layout = works[0].policy, states[0].packed.layout
        packed = [s.packed for s in states]
        reasons: list[list[str]] = [[] for _ in works]
        for k in range(max(len(w.requests) for w in works)):
            members = sorted((i for i, w in enumerate(works) if len(w.requests) > k), key=lambda i: works[i].requests[k])  # fmt: skip
            obs = _round_observation(works[members[0]], [works[i].requests[k] for i in members])
            flat = torch.stack([packed[i].flat for i in members])
            update = policy.update_batch(layout.split(flat), obs, self.runner.source)
            new_flat = layout.pack_rows(update.state, len(members))
            finite = finite_rows(new_flat).tolist()
            for row, i in enumerate(members):
                if not finite[row]:  # never store NaN/inf: this update is dropped
                    self.metrics.nonfinite_updates.inc()
                    continue
                packed[i] = PackedTensors(new_flat[row], layout)
                if update.reset_reasons[row]:
                    reasons[i].append(update.reset_reasons[row])  # type: ignore[arg-type]
        now = self._clock()
        return [
            (
                replace(
                    state,
                    packed=packed[i],
                    version=state.version + 1,
                    samples_seen=state.samples_seen + sum(job.size for job in w.jobs),
                    updates=state.updates + len(w.requests),
                    resets=state.resets + len(reasons[i]),
                    updated_at=now,
                ),
                reasons[i],
            )
            for i, (w, state) in enumerate(zip(works, states, strict=True))
        ]

    def _observe_groups(self, labels: list[str], sizes: list[int], result: ForwardResult) -> None:
        """Per-group image counts and drift signals: one observation per group and batch
        (request r, of `sizes[r]` images, is in group `labels[r]`)."""
        rows: dict[str, list[int]] = {}
        offset = 0
        for label, size in zip(labels, sizes, strict=True):
            rows.setdefault(label, []).extend(range(offset, offset + size))
            offset += size
        gate = result.gate
        filtered = ~gate.accepted & ~gate.open_set
        for group, group_rows in rows.items():
            index = slice(None) if len(rows) == 1 else torch.tensor(group_rows)
            self.metrics.group_images.labels(group=group).inc(len(group_rows))
            self.metrics.group_filtered.labels(group=group).inc(int(filtered[index].sum()))
            self.metrics.group_open_set.labels(group=group).inc(int(gate.open_set[index].sum()))
            self.drift.observe(group, result.probs[index], result.raw_logits[index])

    def _predictions(self, result: ForwardResult, sizes: list[int], top_ks: list[int]) -> list[list[ImagePrediction]]:  # fmt: skip
        """Each job's predictions, from one top-k over the whole batch."""
        names = self.runner.model.card.class_names
        k = min(max(top_ks), result.probs.shape[1])
        scores, labels = (t.tolist() for t in result.probs.topk(k, dim=1))
        open_set, open_score = result.gate.open_set.tolist(), result.gate.open_set_score.tolist()
        out, row = [], 0
        for size, top_k in zip(sizes, top_ks, strict=True):
            answers = []
            for i in range(row, row + size):
                top = [
                    {"label": c, "class_name": names[c], "score": s}
                    for s, c in zip(scores[i][:top_k], labels[i][:top_k], strict=True)
                ]
                answers.append(ImagePrediction(
                    label=top[0]["label"], class_name=top[0]["class_name"], score=top[0]["score"],
                    top_k=top, open_set=bool(open_set[i]), open_set_score=float(open_score[i]),
                ))  # fmt: skip
            out.append(answers)
            row += size
        return out

    async def _commit(self, w: _StreamWork, degraded: bool) -> None:
        """Write the stream's next state with compare-and-set, then answer its jobs."""
        final = w.new_state
        if final is not None and not degraded:
            final, degraded = await self._write_with_retry(w, final)
        shown = final or w.state
        for job in w.jobs:
            if job.future.done():
                continue
            job.future.set_result(PredictOutcome(
                predictions=w.answers[id(job)],
                policy=shown.policy,
                samples_seen=shown.samples_seen,
                state_version=shown.version,
                degraded=degraded,
                reset=bool(w.reset_reasons),
            ))  # fmt: skip
            self.metrics.images.labels(policy=shown.policy).inc(job.size)

    async def _write_with_retry(self, w: _StreamWork, new: StreamState) -> tuple[StreamState | None, bool]:  # fmt: skip
        expected = w.state.version
        for attempt in range(CAS_ATTEMPTS):
            try:
                with self.metrics.store_latency("cas"):
                    ok = await self.store.compare_and_set(w.key, expected, StoredRecord(new.version, encode_state(new)))  # fmt: skip
                if ok:
                    self.metrics.state_updates.labels(policy=new.policy).inc()
                    return new, False
                self.metrics.cas_conflicts.inc()
                await _backoff(attempt)
                with self.metrics.store_latency("get"):
                    (record,) = await self.store.get_many([w.key])
            except StoreUnavailableError:
                self.metrics.store_errors.labels(operation="cas").inc()
                return new, True
            current = self._decode(record)
            if current is None or current.policy != w.state.policy:
                # deleted or reset to another policy meanwhile: this update no longer applies
                return current if current and current.policy else None, False
            expected = current.version
            ((new, w.reset_reasons),) = self._apply([w], [current])
        log.warning("giving up on a state update after %d conflicts", CAS_ATTEMPTS)
        self.metrics.state_updates_dropped.inc()
        return None, False

    # --- stream management -----------------------------------------------------------------
    async def reset(self, stream_id: str, policy_name: str | None) -> StreamState:
        """Return a stream to the source model (optionally switching its policy)."""
        key = self.key(stream_id)
        for attempt in range(CAS_ATTEMPTS):
            if attempt:
                await _backoff(attempt - 1)
            (record,) = await self.store.get_many([key])
            current = self._decode(record)
            name = policy_name or (current.policy if current and current.policy else self.default_policy)  # fmt: skip
            fresh = self.fresh_state(name, current if current and current.policy else None)
            expected = record.version if record else 0
            fresh = replace(fresh, version=expected + 1)
            if await self.store.compare_and_set(key, expected, StoredRecord(fresh.version, encode_state(fresh))):  # fmt: skip
                self.metrics.resets.labels(reason="client").inc()
                return fresh
        raise ApiError("conflict", "the stream is being updated too often to reset; retry", 409)

    async def delete(self, stream_id: str) -> bool:
        return await self.store.delete(self.key(stream_id))

    def close(self) -> None:
        self._executor.shutdown(wait=True)


async def _backoff(attempt: int) -> None:
    """The random wait after the `attempt`-th compare-and-set conflict (from 0)."""
    await asyncio.sleep(random.uniform(0.0, min(CAS_BACKOFF_CAP_S, CAS_BACKOFF_S * 2**attempt)))  # fmt: skip


def _round_observation(work: _StreamWork, requests: list[int]) -> BatchObservation:
    """What requests `requests` of the forward pass `work` took part in contribute (all its
    requests in order: the forward's tensors as they are; otherwise their rows gathered)."""
    result, segments = work.forward, work.segments
    assert result is not None and segments is not None
    if requests == list(range(segments.count)):
        rows, picked = None, segments
    else:
        offsets = segments.offsets
        rows = torch.cat([torch.arange(offsets[r], offsets[r + 1]) for r in requests])
        picked = Segments.from_sizes([offsets[r + 1] - offsets[r] for r in requests])

    def take(t: torch.Tensor) -> torch.Tensor:
        return t if rows is None else t[rows]

    return BatchObservation(
        moments=[(take(m), take(v)) for m, v in result.moments],
        probs=take(result.probs),
        logits=take(result.raw_logits),
        accepted=take(result.gate.accepted),
        open_set=take(result.gate.open_set),
        segments=picked,
        grads={k: g if rows is None else g[requests] for k, g in result.grads.items()},
    )
