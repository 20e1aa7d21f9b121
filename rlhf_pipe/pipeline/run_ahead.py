"""Generation running ahead of training, with bounded staleness (train_config.max_staleness).

With max_staleness s >= 1 one thread owns the rollout engine and runs one step's
`engine.generate` after another, each into that step's own bounded channel; the trainer
consumes step k's channel through the usual Forward / Advantage / Train stages (stages.py),
micro-batch by micro-batch, while this thread is already generating step k+1.

```
gen thread  |G(k) ........|G(k+1) .......|load W(k)|G(k+2) ......|
trainer     |   F T(k) ..opt|  F T(k+1) ..opt|   F T(k+2) ..opt|
                          ^ publish W(k): a snapshot, applied by the gen thread between steps
```

The rules, each deterministic (they do not depend on timing), so a run with s >= 1 is
reproducible and resumes bit for bit:

- Step j is generated with the weights published at the end of step j - s - 1 (the initial
  weights for j <= s). s = 0 is today's serial order; s = 1 is "one step off".
- Weights reach the engine only between two steps' `generate` calls, applied by this thread
  (the in-process vLLM engine is not thread-safe). No request is ever in flight at a sync:
  every answer of a step, hence every GRPO group, comes from one policy version ("finish on
  the old weights").
- Bounded: while step k trains, at most steps k..k+s exist (s + 1 steps' samples), each
  channel holds one step; published snapshots wait here until applied (at most s + 1).
- The prompts of every step are drawn by `plan_fn(step)` on this thread, in step order, so
  the data and seeds per step are those of s = 0; only the generating weights differ.

`quiesce()` waits until the thread has generated everything it may (steps up to k+s) and is
waiting for the next weights; the engine then holds the trainer's current weights and is idle,
so the trainer can evaluate on it or checkpoint the in-flight steps (`state_dict`).
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from dataclasses import dataclass, field

from rlhf_pipe.pipeline.channel import Channel, PipelineAborted
from rlhf_pipe.rollout.types import Completion

log = logging.getLogger(__name__)


@dataclass
class _Step:
    plan: object  # stages.StepPlan, fresh prompts only (the trainer adds relay samples)
    channel: Channel  # its own abort event: a later step's failure leaves this one readable
    completions: list[Completion] = field(default_factory=list)  # in completion order
    done: bool = False


class _Tee:
    """The engine's sink: each completion into the step's channel, and kept for checkpoints.
    Several engines (EnginePool) put from their own threads: the lock keeps the kept order
    the channel's, so a resumed run replays the in-flight samples in the order trained."""

    def __init__(self, step: _Step):
        self.step = step
        self._lock = threading.Lock()

    def put(self, c: Completion) -> None:
        with self._lock:  # the channel holds a whole step: this put never blocks
            self.step.completions.append(c)
            self.step.channel.put(c)


class RunAhead:
    """The generation thread for max_staleness >= 1 (see the module docstring).

    `plan_fn(step) -> StepPlan`; `publish(step, version, snapshot)` after each optimizer step
    (None: unchanged); `take(step) -> (plan, channel)` for the Train side. `load(snapshot,
    version) -> sync stats` puts a published snapshot into the engine, on this thread;
    by default the snapshot is named tensors for `engine.load_weights` (the trainer's direct
    sync passes a version whose weights wait on the actor's device instead)."""

    def __init__(
        self,
        engine,
        max_staleness: int,
        plan_fn,
        first_step: int,
        timeout_s: float,
        state: dict | None = None,
        load=None,
    ):
        if max_staleness < 1:
            raise ValueError(f"RunAhead needs max_staleness >= 1, got {max_staleness}")
        self.engine, self.s, self._plan_fn = engine, max_staleness, plan_fn
        self.timeout_s = timeout_s
        self._load = load or (lambda tensors, version: engine.load_weights(iter(tensors), version))
        self.abort = threading.Event()
        self._cond = threading.Condition()
        self._published = first_step - 1  # steps < first_step have published their weights
        self._weights: dict[int, tuple[int, object]] = {}  # step -> (version, snapshot)
        self._steps: dict[int, _Step] = {}
        self._next = first_step  # the next step to generate
        self._waiting = False  # True while the thread waits for weights
        self.error: str | None = None
        # (step, start, end, version) per generated step, perf_counter seconds; and
        # (step, start, end) of each step's Train stage, as publish() reports it.
        self.timeline: list[tuple[int, float, float, int]] = []
        self.trained: list[tuple[int, float, float]] = []
        self.last_sync: dict = {}  # the engine's report of the last weights it loaded
        for j, saved in sorted((state or {}).get("steps", {}).items()):
            st = self._new_step(saved["plan"])
            for c in saved["completions"]:
                st.completions.append(c)
                st.channel.put(c)
            st.channel.close()
            st.done = True
            self._steps[j] = st
        if state:
            self._next = state["next_step"]
        self._thread = threading.Thread(target=self._body, name="rlhf_pipe-run-ahead", daemon=True)
        self._thread.start()

    def _new_step(self, plan) -> _Step:
        size = plan.samples_per_step - len(plan.relay) + 1  # + END
        return _Step(plan, Channel("run-ahead generate", size, threading.Event(), self.timeout_s))

    def _stop(self, steps) -> None:
        """Stop the thread, and the readers (and engine) of `steps`' channels."""
        self.abort.set()
        for st in steps:
            st.channel.abort.set()

    # ------------------------------------------------------------------ generation thread

    def _body(self) -> None:
        try:
            while not self.abort.is_set():
                self._generate_one(self._next)
        except PipelineAborted:
            pass
        except BaseException as e:
            log.error("run-ahead generation failed", exc_info=True)
            with self._cond:
                self.error = f"{type(e).__name__}: {e}\n{traceback.format_exc()}"
                # Steps generated before the failure stay readable: they train as usual.
                self._stop([st for st in self._steps.values() if not st.done])
                self._cond.notify_all()

    def _generate_one(self, j: int) -> None:
        need = j - self.s - 1  # the step whose weights generate step j
        with self._cond:
            self._waiting = True
            self._cond.notify_all()
            while self._published < need and not self.abort.is_set():
                self._cond.wait(0.1)
            self._waiting = False
            if self.abort.is_set():
                raise PipelineAborted("run-ahead")
            stale = [k for k in self._weights if k < need]
            for k in stale:  # superseded (only after a resume with a different schedule)
                del self._weights[k]
            pending = self._weights.pop(need, None)
        if pending is not None:
            version, snapshot = pending
            if snapshot is not None:  # None: that step left the policy unchanged
                self.last_sync = self._load(snapshot, version)
        plan = self._plan_fn(j)
        st = self._new_step(plan)
        with self._cond:
            self._steps[j] = st
            self._cond.notify_all()
        start = time.perf_counter()
        if plan.prompt_ids:
            indices = list(range(len(plan.prompt_ids)))
            self.engine.generate(plan.prompt_ids, indices, plan.sampling, plan.seeds, _Tee(st))
        st.channel.close()
        self.timeline.append((j, start, time.perf_counter(), self.engine.version))
        with self._cond:
            st.done = True
            self._next = j + 1
            self._cond.notify_all()

    # ------------------------------------------------------------------ trainer side

    def raise_if_failed(self) -> None:
        """The generation thread's failure, if it failed."""
        if self.error is not None:
            raise RuntimeError(f"run-ahead generation failed: {self.error}")

    def take(self, step: int):
        """The plan of `step` and the channel its completions arrive on (blocks until the
        thread has planned it)."""
        deadline = time.monotonic() + self.timeout_s
        with self._cond:
            while step not in self._steps:
                self.raise_if_failed()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"run-ahead: step {step} not planned in {self.timeout_s} s")
                self._cond.wait(0.1)
            st = self._steps[step]
        return st.plan, st.channel

    def publish(self, step: int, version: int, snapshot, train_span=None) -> None:
        """Step `step` has trained: `snapshot` (what `load` takes: by default named tensors
        that nothing changes any more; None when this step did not update the policy) becomes
        the engine's before step + s + 1 is generated. The step's samples are dropped (they
        are trained). `train_span`: (start, end) of its Train stage, perf_counter seconds,
        for `trained`."""
        if train_span is not None:
            self.trained.append((step, *train_span))
        with self._cond:
            self._weights[step] = (version, snapshot)
            self._published = step
            self._steps.pop(step, None)
            self._cond.notify_all()

    def quiesce(self) -> None:
        """Wait until every step the bound allows is generated and the thread waits for
        weights: the engine is idle and holds the last published weights."""
        deadline = time.monotonic() + self.timeout_s
        with self._cond:
            while not (self._waiting and self._next == self._published + self.s + 2):
                self.raise_if_failed()
                if time.monotonic() > deadline:
                    raise TimeoutError(f"run-ahead: not idle within {self.timeout_s} s")
                self._cond.wait(0.1)

    def state_dict(self) -> dict:
        """The generated-but-untrained steps (plans, completions with their token ids and
        versions) and where generation continues. Call after quiesce()."""
        with self._cond:
            steps = {
                j: {"plan": st.plan, "completions": list(st.completions)}
                for j, st in self._steps.items()
            }
            return {"max_staleness": self.s, "next_step": self._next, "steps": steps}

    def close(self) -> None:
        with self._cond:
            self._stop(self._steps.values())
            self._cond.notify_all()
        self._thread.join(timeout=60)


def staleness_metrics(samples, trained_version: int, max_staleness: int) -> dict:
    """`staleness/<d>`: how many fresh samples were trained d versions after the version that
    generated them; `staleness/violations`: how many of them exceed max_staleness. Replayed
    (relay) samples are old by design and not counted."""
    m: dict = {"staleness/violations": 0}
    for s in samples:
        if s.relay_from is not None:
            continue
        d = trained_version - s.version
        m[f"staleness/{d}"] = m.get(f"staleness/{d}", 0) + 1
        m["staleness/violations"] += int(d > max_staleness or d < 0)
    return m
