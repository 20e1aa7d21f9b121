"""Roles and engines on other ranks: a proxy on the controller, a serve loop on their rank.

The controller (the rank of vLLM engine 0) runs the unchanged StepPipeline. Each rank that
hosts roles or an engine shares a private two-rank gloo group with it. A call is one `Message`
and its `Reply` on that group, under a lock, so calls to the roles of one rank run strictly in
order (the Forward and Train stages take turns on the actor: infer(i), train(i), infer(i+1),
...), while different ranks work at the same time. Errors travel back as replies and are
raised on the controller, naming the rank and role.

What a rank answers, and how a role on several ranks dispatches a call, is derived from the
protocols (rlhf_pipe.protocols): the proxies below are generated from them. Weights travel in
flat buckets (`bucket_mb`, rlhf_pipe.distributed.buckets), one tensor send per bucket, never
one message per parameter. The transport is gloo between ranks, or `LoopbackTransport` (both
ends in one process, for tests).
"""

from __future__ import annotations

import contextlib
import inspect
import logging
import pickle
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from rlhf_pipe.distributed import buckets
from rlhf_pipe.protocols import (
    MODEL_ROLES,
    PROTOCOLS,
    Dispatch,
    Member,
    Role,
    members,
    remote_methods,
)

logger = logging.getLogger(__name__)

# What a serving rank answers, per role (and Role.ROLLOUT: an engine).
REMOTE_METHODS: dict[Role, frozenset[str]] = {r: remote_methods(p) for r, p in PROTOCOLS.items()}


class RemoteRoleError(RuntimeError):
    pass


# ----------------------------------------------------------------------------- messages


@dataclass(frozen=True)
class Message:
    """A request: `method` of `target` (a role, or Role.ROLLOUT for an engine). `buckets`:
    flat tensors that follow the message, unpacked into named tensors as the first argument.
    An empty target is the stop message."""

    target: str
    method: str
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)
    buckets: tuple[buckets.Bucket, ...] = ()


STOP = Message("", "stop")


@dataclass(frozen=True)
class Reply:
    """The answer to a Message. `error`: the method raised (its type and message). `item`: one
    put of a streaming method; more replies follow. `buckets`: the value is named tensors,
    sent as flat tensors after the reply. `on_rank_s`: seconds inside the method."""

    value: Any = None
    error: str | None = None
    on_rank_s: float = 0.0
    item: bool = False
    buckets: tuple[buckets.Bucket, ...] = ()


# ----------------------------------------------------------------------------- transports


class Transport(Protocol):
    def send(self, obj: Message | Reply) -> None: ...
    def recv(self) -> Any: ...
    def send_tensor(self, t: torch.Tensor) -> None: ...
    def recv_tensor(self, t: torch.Tensor) -> None:
        """Receive into `t` (its size and dtype are known from the message)."""
        ...


class GlooTransport:
    """One end of a private two-rank process group."""

    def __init__(self, peer: int, group):
        self.peer, self.group = peer, group

    def send(self, obj) -> None:
        import torch.distributed as dist

        dist.send_object_list([obj], dst=self.peer, group=self.group)

    def recv(self):
        import torch.distributed as dist

        box = [None]
        dist.recv_object_list(box, src=self.peer, group=self.group)
        return box[0]

    def send_tensor(self, t: torch.Tensor) -> None:
        import torch.distributed as dist

        dist.send(t, dst=self.peer, group=self.group)

    def recv_tensor(self, t: torch.Tensor) -> None:
        import torch.distributed as dist

        dist.recv(t, src=self.peer, group=self.group)


class LoopbackTransport:
    """Both ends of a connection in one process: messages are pickled as gloo pickles them,
    tensors copied, so the serve loop and the proxies run unchanged in tests. A peer that says
    nothing for `timeout_s` is a RuntimeError, as a gloo timeout is."""

    def __init__(self, inbox: queue.Queue, outbox: queue.Queue, timeout_s: float):
        self._inbox, self._outbox, self.timeout_s = inbox, outbox, timeout_s

    @classmethod
    def pair(cls, timeout_s: float = 60.0) -> tuple[LoopbackTransport, LoopbackTransport]:
        a: queue.Queue = queue.Queue()
        b: queue.Queue = queue.Queue()
        return cls(a, b, timeout_s), cls(b, a, timeout_s)

    def _get(self):
        try:
            return self._inbox.get(timeout=self.timeout_s)
        except queue.Empty:
            raise RuntimeError(f"loopback peer sent nothing for {self.timeout_s:.0f} s") from None

    def send(self, obj) -> None:
        self._outbox.put(pickle.dumps(obj))

    def recv(self):
        return pickle.loads(self._get())

    def send_tensor(self, t: torch.Tensor) -> None:
        self._outbox.put(t.detach().clone())

    def recv_tensor(self, t: torch.Tensor) -> None:
        t.copy_(self._get())


# ----------------------------------------------------------------------------- controller end


class Connection:
    """The controller's end of one rank's transport."""

    def __init__(self, transport: Transport, peer: int, roles: tuple[str, ...]):
        self.transport, self.peer, self.roles = transport, peer, roles
        self.lock = threading.Lock()
        # target -> [seconds of its calls here, seconds of them spent in the method on the
        # peer]: the difference is transport (pickle, gloo, host copies) and waiting.
        self._seconds: dict[str, list[float]] = {}

    def take_seconds(self, role: str) -> tuple[float, float]:
        """(call seconds, on-rank seconds) of `role`'s calls since the last take."""
        with self.lock:
            call_s, on_rank_s = self._seconds.pop(role, (0.0, 0.0))
        return call_s, on_rank_s

    def _unreachable(self, e: Exception) -> RemoteRoleError:
        return RemoteRoleError(
            f"rank {self.peer} ({'+'.join(self.roles)}) unreachable: "
            f"{' '.join(str(e).split())[:300]}"
        )

    def call(
        self,
        target: str,
        method: str,
        args: tuple = (),
        kwargs: dict | None = None,
        *,
        tensors: Sequence[tuple[buckets.Bucket, torch.Tensor]] = (),
        sink=None,
        what: str | None = None,
    ):
        """One request and its reply; returns the reply's value (a list of named tensors when
        it came in buckets). `tensors`: packed buckets sent after the message. `sink`: takes
        each item a streaming method puts. `what` names the target in errors."""
        with self.lock:
            start = time.perf_counter()
            try:
                self.transport.send(
                    Message(target, method, tuple(args), kwargs or {}, tuple(b for b, _ in tensors))
                )
                for _, flat in tensors:
                    self.transport.send_tensor(flat)
                reply = self.transport.recv()
                while reply.item and reply.error is None:
                    sink.put(reply.value)
                    reply = self.transport.recv()
                value = reply.value
                if reply.error is None and reply.buckets:
                    value = []
                    for bucket in reply.buckets:
                        flat = buckets.empty(bucket)
                        self.transport.recv_tensor(flat)
                        value.extend(buckets.unpack(bucket, flat))
            except RuntimeError as e:  # gloo: peer closed the connection, or timed out
                if isinstance(e, RemoteRoleError):
                    raise
                raise self._unreachable(e) from e
            seconds = self._seconds.setdefault(target, [0.0, 0.0])
            seconds[0] += time.perf_counter() - start
            seconds[1] += reply.on_rank_s
        if reply.error is not None:
            raise RemoteRoleError(f"rank {self.peer} ({what or target}): {reply.error}")
        return value

    def close(self) -> None:
        with self.lock:
            self.transport.send(STOP)


# ----------------------------------------------------------------------------- serving end


def _to_cpu(obj):
    """Replies cross ranks by pickle; device tensors must not (the peer may have no GPU)."""
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, tuple) and hasattr(type(obj), "_fields"):  # a NamedTuple (a Bucket)
        return type(obj)(*(_to_cpu(x) for x in obj))
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(x) for x in obj)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    return obj


class _Stream:
    """The sink a streaming method gets on the serving rank: each put is one reply."""

    def __init__(self, transport: Transport):
        self.transport = transport

    def put(self, item) -> None:
        self.transport.send(Reply(item, item=True))


def serve(targets: dict[str, Any], transport: Transport, bucket_bytes: int) -> None:
    """Answer the controller's calls on `targets` (role name -> role object, or Role.ROLLOUT
    -> an engine) until it sends STOP. Only members of each target's protocol are answered."""
    allowed = {name: members(PROTOCOLS[Role(name)]) for name in targets}
    while True:
        msg = transport.recv()
        if not msg.target:
            return
        # Tensors that came with the message are taken first, so a refused call leaves the
        # transport in step.
        named = []
        for bucket in msg.buckets:
            flat = buckets.empty(bucket)
            transport.recv_tensor(flat)
            named.extend(buckets.unpack(bucket, flat))
        try:
            member = allowed.get(msg.target, {}).get(msg.method)
            if member is None or member.remote.dispatch == Dispatch.LOCAL:
                raise AttributeError(f"{msg.target} has no remote method {msg.method!r}")
            _answer(targets[msg.target], member, msg, named, transport, bucket_bytes)
        except Exception as e:  # reported on the controller, which stops the run
            logger.exception("%s.%s failed", msg.target, msg.method)
            transport.send(Reply(error=f"{type(e).__name__}: {e}"))


def _answer(obj, member: Member, msg: Message, named: list, transport, bucket_bytes) -> None:
    args = ([named] if msg.buckets else []) + list(msg.args)
    if member.remote.streams:
        args.append(_Stream(transport))
    start = time.perf_counter()
    value = getattr(obj, msg.method)
    if member.kind == "method":
        value = value(*args, **msg.kwargs)
    if member.remote.tensors_out:
        packed = buckets.pack(value, bucket_bytes)
        transport.send(
            Reply(buckets=tuple(b for b, _ in packed), on_rank_s=time.perf_counter() - start)
        )
        for _, flat in packed:
            transport.send_tensor(flat)
        return
    # _to_cpu waits for the device, so the seconds include the method's GPU work.
    value = _to_cpu(value)
    transport.send(Reply(value, on_rank_s=time.perf_counter() - start))


# ----------------------------------------------------------------------------- role proxies


def _proxy_member(name: str, member: Member, send: Callable[..., Any]):
    """A proxy's method (or property) for one protocol member: `send(self, name, args,
    kwargs)` does the call. It has the protocol's signature and docstring."""
    if member.kind == "property":
        return property(lambda self: send(self, name, (), {}), doc=member.fn.__doc__)

    def method(self, *args, **kwargs):
        value = send(self, name, args, kwargs)
        return iter(value) if member.remote.tensors_out else value

    method.__name__ = method.__qualname__ = name
    method.__doc__ = member.fn.__doc__
    method.__signature__ = inspect.signature(member.fn)  # type: ignore[attr-defined]
    return method


def _proxy_class(base: type, protocol: type, dispatches: dict[Dispatch, Callable]) -> type:
    """`base` plus one member per protocol member whose dispatch is in `dispatches`."""
    ns = {
        name: _proxy_member(name, m, dispatches[m.remote.dispatch])
        for name, m in members(protocol).items()
        if m.remote.dispatch in dispatches and name not in vars(base)
    }
    return type(f"{base.__name__}[{protocol.__name__}]", (base,), ns)


class RemoteRole:
    """Stands in for a role object of rlhf_pipe.roles living on another rank: every member of
    its protocol is a call on that rank (see `remote_role`)."""

    def __init__(self, conn: Connection, name: Role):
        self._conn, self._name = conn, name

    def _send(self, method: str, args: tuple, kwargs: dict):
        return self._conn.call(self._name, method, args, kwargs)

    def take_call_seconds(self) -> tuple[float, float]:
        return self._conn.take_seconds(self._name)

    def __repr__(self) -> str:
        return f"RemoteRole({self._name} on rank {self._conn.peer})"


def _no_function(self, fn) -> None:
    raise TypeError(
        f"{self!r}: a Python reward function cannot go to another rank; name it in "
        "model_configs.reward instead"
    )


class _RemoteReward(RemoteRole):
    set_function = _no_function


_ONE_RANK = {d: RemoteRole._send for d in (Dispatch.GROUP, Dispatch.ALL, Dispatch.FIRST)}
_ONE_RANK[Dispatch.PEER] = RemoteRole._send
REMOTE_ROLE_CLASSES: dict[Role, type] = {
    role: _proxy_class(
        _RemoteReward if role == Role.REWARD else RemoteRole, PROTOCOLS[role], _ONE_RANK
    )
    for role in MODEL_ROLES
}


def remote_role(conn: Connection, role: Role) -> RemoteRole:
    """The proxy of `role` on the rank behind `conn`."""
    return REMOTE_ROLE_CLASSES[Role(role)](conn, Role(role))


# ----------------------------------------------------------------------------- engines


class RemoteEngine:
    """A vLLM engine on another rank, driven like a local one. Completions stream back one
    message each, as they finish, so micro-batches still form in completion order."""

    def __init__(self, conn: Connection, engine_index: int, bucket_bytes: int):
        self._conn, self.engine_index, self._bucket_bytes = conn, engine_index, bucket_bytes
        self.version = 0
        self.last_sync: dict = {}

    def _call(self, method: str, args: tuple, **kw):
        what = f"rollout engine {self.engine_index}"
        return self._conn.call(Role.ROLLOUT, method, args, what=what, **kw)

    def generate(self, prompt_ids, prompt_indices, settings, seeds, sink) -> None:
        self._call("generate", (prompt_ids, prompt_indices, settings, seeds), sink=sink)

    def load_weights(self, named_tensors, version: int) -> dict:
        packed = buckets.pack(named_tensors, self._bucket_bytes)
        self.last_sync = self._call("load_weights", (version,), tensors=packed)
        self.version = version
        return self.last_sync

    def init_weight_group(
        self,
        host: str,
        port: int,
        rank_offset: int,
        world_size: int,
        backend: str,
        timeout_s: float,
    ) -> None:
        self._call("init_weight_group", (host, port, rank_offset, world_size, backend, timeout_s))

    def receive_weights(self, layout, version: int) -> dict:
        self.last_sync = self._call("receive_weights", (layout, version))
        self.version = version
        return self.last_sync


def run_all(fns, timeout_s: float | None = None, what: str = "") -> list:
    """Call every fn in its own thread; return their results in order, or raise the first
    error once all have returned. With `timeout_s`, a call still running at the deadline is an
    error (a peer blocked in NCCL, which has no timeout of its own)."""
    results, errors = [None] * len(fns), []

    def body(i, fn):
        try:
            results[i] = fn()
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=body, args=(i, fn), daemon=True) for i, fn in enumerate(fns)]
    for t in threads:
        t.start()
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    for t in threads:
        t.join(None if deadline is None else max(0.0, deadline - time.monotonic()))
    if any(t.is_alive() for t in threads) and not errors:
        raise TimeoutError(
            f"no progress {what} for {timeout_s:.0f} s (train_config.stage_timeout_s)"
        )
    if errors:
        raise errors[0]
    return results


class EnginePool:
    """Several engines behind the one-engine interface. Prompts are dealt round-robin; every
    engine streams into the same sink, so micro-batches form in completion order across
    engines and each sample lands in exactly one of them (ids are global)."""

    def __init__(self, engines: list):
        self.engines = engines
        self.last_sync: dict = {}

    @property
    def version(self) -> int:
        return min(e.version for e in self.engines)

    def generate(self, prompt_ids, prompt_indices, settings, seeds, sink) -> None:
        share = [([], [], []) for _ in self.engines]
        for i, (ids, index, seed) in enumerate(zip(prompt_ids, prompt_indices, seeds)):
            part = share[i % len(self.engines)]
            part[0].append(ids), part[1].append(index), part[2].append(seed)
        self._each(
            lambda e, part: (
                e.generate(part[0], part[1], settings, part[2], sink) if part[0] else None
            ),
            share,
        )

    def load_weights(self, named_tensors, version: int) -> dict:
        named = list(named_tensors)
        self._each(lambda e, _: e.load_weights(named, version), [None] * len(self.engines))
        seconds = max(e.last_sync.get("seconds", 0.0) for e in self.engines)
        nbytes = sum(e.last_sync.get("bytes", 0) for e in self.engines)
        self.last_sync = {
            "seconds": seconds,
            "bytes": nbytes,
            "gbps": nbytes / max(seconds, 1e-9) / 1e9,
        }
        return self.last_sync

    def _each(self, fn, parts) -> None:
        run_all([lambda e=e, p=p: fn(e, p) for e, p in zip(self.engines, parts)])


# ----------------------------------------------------------------------------- data parallel


class RemoteRoleGroup:
    """A role on several data-parallel ranks. The controller deals chunks (of the size the
    role pads together) round-robin over the ranks and reassembles results in order;
    gradients are summed across the ranks inside `prepare_step`, so the update equals the
    one-rank update up to the order of float additions.

    Under DeepSpeed (`zero_stage` set) every rank joins every train call, and under ZeRO-3
    every forward and weight gather too, with `pad_to` zero-weight passes for the ranks with
    fewer chunks: ZeRO's collectives run inside those calls (rlhf_pipe.zero). Its optimizer
    state is partitioned, so every rank joins training_state's gathers.

    The methods here are the protocols' Dispatch.GROUP members; those marked ALL or FIRST are
    generated (`remote_role_group`)."""

    def __init__(
        self,
        conns: list[Connection],
        name: str,
        infer_micro_bs: int,
        train_micro_bs: int,
        zero_stage: int | None = None,
    ):
        self._conns, self._name = conns, name
        self._infer, self._train = infer_micro_bs, train_micro_bs
        self._zero = zero_stage
        # Under DeepSpeed a call is a collective of the ranks, so they must all see calls in
        # the same order: one call at a time for the whole group (the Forward and Train
        # stages would otherwise reach the two ranks' locks in different orders).
        self._order = threading.Lock() if zero_stage is not None else contextlib.nullcontext()

    def take_call_seconds(self) -> tuple[float, float]:
        """Summed over the ranks, whose calls overlap in time."""
        parts = [c.take_seconds(self._name) for c in self._conns]
        return sum(p[0] for p in parts), sum(p[1] for p in parts)

    def _parallel(self, calls: list[tuple]) -> list:
        with self._order:
            return self._parallel_unordered(calls)

    def _parallel_unordered(self, calls: list[tuple]) -> list:
        # A call is (conn, method, args) or (conn, method, args, kwargs).
        return run_all([lambda c=c: c[0].call(self._name, *c[1:]) for c in calls])

    def _deal(self, items: list, size: int) -> list[list[int]]:
        """Indices of `items` per rank: chunk j of `size` goes to rank j % dp."""
        per_rank = [[] for _ in self._conns]
        for j, start in enumerate(range(0, len(items), size)):
            per_rank[j % len(self._conns)].extend(range(start, min(start + size, len(items))))
        return per_rank

    def _calls(self, method: str, items: list, size: int, extra: tuple, every_rank: bool):
        """(indices per called rank, calls): ranks with nothing are skipped unless
        `every_rank`, where each rank pads to the largest chunk count."""
        dealt = self._deal(items, size)
        if not every_rank:
            dealt = [(c, idx) for c, idx in zip(self._conns, dealt) if idx]
            return (
                [idx for _, idx in dealt],
                [(c, method, ([items[i] for i in idx], *extra)) for c, idx in dealt],
            )
        pad_to = max(-(-len(idx) // size) for idx in dealt)
        return dealt, [
            (c, method, ([items[i] for i in idx], *extra), {"pad_to": pad_to})
            for c, idx in zip(self._conns, dealt)
        ]

    def _forward(self, method: str, samples: list) -> list:
        live, calls = self._calls(method, samples, self._infer, (), self._zero == 3)
        out = [None] * len(samples)
        for idx, values in zip(live, self._parallel(calls)):
            for i, v in zip(idx, values):
                out[i] = v
        return out

    def logprobs(self, samples):
        return self._forward("logprobs", samples)

    def values(self, samples):
        return self._forward("values", samples)

    def scores(self, samples):
        return self._forward("scores", samples)

    def train(self, samples, loss, num_samples):
        _, calls = self._calls(
            "train", samples, self._train, (loss, num_samples), self._zero is not None
        )
        return _sum_metrics(self._parallel(calls))

    def ptx(self, token_ids, weight, total=None):
        if total is None:
            total = sum(max(len(t) - 1, 0) for t in token_ids)
        _, calls = self._calls(
            "ptx", token_ids, self._train, (weight, total), self._zero is not None
        )
        return _sum_metrics(self._parallel(calls))

    def training_state(self):
        if self._zero is None:
            return self._conns[0].call(self._name, "training_state")
        # Every rank joins ZeRO's gathers; the first returns the whole (universal) state.
        return self._parallel([(c, "training_state", ()) for c in self._conns])[0]

    def save(self, out_dir):
        # ZeRO-3: every rank gathers, the first writes.
        conns = self._conns if self._zero == 3 else self._conns[:1]
        self._parallel([(c, "save", (out_dir,)) for c in conns])

    def _on_all(self, method: str, args: tuple, kwargs: dict):
        # e.g. prepare_step: every rank joins the gradient all-reduce; the norms are then equal.
        return self._parallel([(c, method, args, kwargs) for c in self._conns])[0]

    def _on_first(self, method: str, args: tuple, kwargs: dict):
        return self._conns[0].call(self._name, method, args, kwargs)

    def join_weights(self) -> None:
        """Nothing to do from here: the ranks join inside `named_weights`."""

    def named_weights(self):
        if self._zero != 3:
            return iter(self._conns[0].call(self._name, "named_weights"))
        # ZeRO-3: the other ranks join each gather while the first sends the weights.
        out, errors = [], []

        def join(conn):
            try:
                conn.call(self._name, "join_weights")
            except BaseException as e:
                errors.append(e)

        joins = [threading.Thread(target=join, args=(c,), daemon=True) for c in self._conns[1:]]
        with self._order:
            for t in joins:
                t.start()
            try:
                out = self._conns[0].call(self._name, "named_weights")
            finally:
                for t in joins:
                    t.join()
        if errors:
            raise errors[0]
        return iter(out)


class _RemoteRewardGroup(RemoteRoleGroup):
    set_function = _no_function


_GROUP_DISPATCH = {Dispatch.ALL: RemoteRoleGroup._on_all, Dispatch.FIRST: RemoteRoleGroup._on_first}
REMOTE_GROUP_CLASSES: dict[Role, type] = {
    role: _proxy_class(
        _RemoteRewardGroup if role == Role.REWARD else RemoteRoleGroup,
        PROTOCOLS[role],
        _GROUP_DISPATCH,
    )
    for role in MODEL_ROLES
}


def remote_role_group(
    conns: list[Connection],
    role: Role,
    infer_micro_bs: int,
    train_micro_bs: int,
    zero_stage: int | None = None,
) -> RemoteRoleGroup:
    """The proxy of `role` on several data-parallel ranks."""
    cls = REMOTE_GROUP_CLASSES[Role(role)]
    return cls(conns, Role(role), infer_micro_bs, train_micro_bs, zero_stage)


def _sum_metrics(parts: list[dict]) -> dict:
    total: dict = {}
    for part in parts:
        for k, v in part.items():
            total[k] = total[k] + v if k in total else v
    return total
