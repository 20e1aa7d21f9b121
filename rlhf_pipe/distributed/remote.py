"""Roles on other ranks: a proxy on the controller, a command loop on the role's rank.

The controller (the rank of vLLM engine 0) runs the unchanged StepPipeline. Each rank that
hosts roles shares a private two-rank gloo group with it. A call is one request and one reply
on that group, under a lock, so calls to the roles of one rank run strictly in order (the
Forward and Train stages take turns on the actor: infer(i), train(i), infer(i+1), ...), while
different ranks work at the same time. Errors travel back as replies and are raised on the
controller, naming the rank and role.

Weights leave the actor in flat buckets (`bucket_mb`), one tensor send per bucket, never one
message per parameter.
"""

from __future__ import annotations

import contextlib
import threading
import time
import traceback

import torch
import torch.distributed as dist

# Methods a remote role answers; anything else is an AttributeError on the proxy, so that
# `getattr(role, "model", None)` and the like behave as for a missing attribute.
REMOTE_METHODS = frozenset(
    {
        "logprobs",
        "values",
        "scores",
        "train",
        "ptx",
        "prepare_step",
        "apply_step",
        "drop_grads",
        "divide_grads",
        "save",
        "training_state",
        "load_training_state",
        "load_weights_from",
        "weight_sync_address",
        "init_weight_sender",
        "weight_layout",
        "broadcast_weights",
        "join_weights",
    }
)
_SEND_WEIGHTS = "__send_weights__"


class RemoteRoleError(RuntimeError):
    pass


def _send(obj, peer: int, group) -> None:
    dist.send_object_list([obj], dst=peer, group=group)


def _recv(peer: int, group):
    box = [None]
    dist.recv_object_list(box, src=peer, group=group)
    return box[0]


class Connection:
    """The controller's end of one role rank's private group."""

    def __init__(self, peer: int, group, roles: tuple[str, ...]):
        self.peer, self.group, self.roles = peer, group, roles
        self.lock = threading.Lock()
        # role -> [seconds of its calls here, seconds of them spent in the method on the
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

    def call(self, role: str, method: str, args=(), kwargs=None):
        with self.lock:
            start = time.perf_counter()
            try:
                _send((role, method, args, kwargs or {}), self.peer, self.group)
                status, value, on_rank_s = _recv(self.peer, self.group)
            except RuntimeError as e:  # gloo: peer closed the connection, or timed out
                raise self._unreachable(e) from e
            seconds = self._seconds.setdefault(role, [0.0, 0.0])
            seconds[0] += time.perf_counter() - start
            seconds[1] += on_rank_s
        if status != "ok":
            raise RemoteRoleError(f"rank {self.peer} ({role}): {value}")
        return value

    def fetch_weights(self, role: str) -> list[tuple[str, torch.Tensor]]:
        with self.lock:
            try:
                _send((role, _SEND_WEIGHTS, (), {}), self.peer, self.group)
                status, meta = _recv(self.peer, self.group)
                if status != "ok":
                    raise RemoteRoleError(f"rank {self.peer} ({role}): {meta}")
                out = []
                for dtype, entries, numel in meta:
                    flat = torch.empty(numel, dtype=dtype)
                    dist.recv(flat, src=self.peer, group=self.group)
                    for name, shape, offset, size in entries:
                        out.append((name, flat[offset : offset + size].view(shape)))
            except RuntimeError as e:
                if isinstance(e, RemoteRoleError):
                    raise
                raise self._unreachable(e) from e
        return out

    def close(self) -> None:
        with self.lock:
            _send(None, self.peer, self.group)


class RemoteRole:
    """Stands in for a role object of rlhf_pipe.roles living on another rank."""

    def __init__(self, conn: Connection, name: str):
        self._conn, self._name = conn, name

    def __getattr__(self, method: str):
        if method not in REMOTE_METHODS:
            raise AttributeError(method)
        return lambda *args, **kwargs: self._conn.call(self._name, method, args, kwargs)

    def named_weights(self):
        return iter(self._conn.fetch_weights(self._name))

    def take_call_seconds(self) -> tuple[float, float]:
        return self._conn.take_seconds(self._name)

    def __repr__(self) -> str:
        return f"RemoteRole({self._name} on rank {self._conn.peer})"


def buckets(named_tensors, bucket_bytes: int):
    """Group tensors into flat same-dtype buckets of at most `bucket_bytes` (a tensor larger
    than that gets a bucket of its own). Returns [(meta, flat)], meta = (dtype, entries,
    numel), entries = [(name, shape, offset, numel)]."""
    out, current, size, dtype = [], [], 0, None

    def flush():
        if current:
            flat = torch.cat([t.reshape(-1) for _, t in current])
            entries, offset = [], 0
            for name, t in current:
                entries.append((name, tuple(t.shape), offset, t.numel()))
                offset += t.numel()
            out.append(((dtype, entries, flat.numel()), flat))

    for name, t in named_tensors:
        t = t.detach().contiguous().cpu()
        nbytes = t.numel() * t.element_size()
        if current and (t.dtype != dtype or size + nbytes > bucket_bytes):
            flush()
            current, size = [], 0
        current.append((name, t))
        size += nbytes
        dtype = t.dtype
    flush()
    return out


def _to_cpu(obj):
    """Replies cross ranks by pickle; device tensors must not (the peer may have no GPU)."""
    if torch.is_tensor(obj):
        return obj.detach().cpu()
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(x) for x in obj)
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    return obj


def serve(
    roles: dict, controller: int, group, bucket_bytes: int, dp_groups: dict | None = None
) -> None:
    """Answer the controller's calls until it says stop (None). `dp_groups` maps a role to
    the process group of its data-parallel ranks, for the gradient all-reduce."""
    for role, dp_group in (dp_groups or {}).items():
        roles[role].dp_group = dp_group
    while True:
        msg = _recv(controller, group)
        if msg is None:
            return
        role, method, args, kwargs = msg
        try:
            if method == _SEND_WEIGHTS:
                packed = buckets(roles[role].named_weights(), bucket_bytes)
                _send(("ok", [meta for meta, _ in packed]), controller, group)
                for _, flat in packed:
                    dist.send(flat, dst=controller, group=group)
                continue
            if method not in REMOTE_METHODS:
                raise AttributeError(f"{role} has no remote method {method!r}")
            start = time.perf_counter()
            # _to_cpu waits for the device, so the seconds include the method's GPU work.
            value = _to_cpu(getattr(roles[role], method)(*args, **kwargs))
            reply = ("ok", value, time.perf_counter() - start)
        except Exception as e:  # reported on the controller, which stops the run
            traceback.print_exc()
            reply = ("error", f"{type(e).__name__}: {e}", 0.0)
        _send(reply, controller, group)


# ----------------------------------------------------------------------------- engines

_END = "__end__"


class RemoteEngine:
    """A vLLM engine on another rank, driven like a local one. Completions stream back one
    message each, as they finish, so micro-batches still form in completion order."""

    def __init__(self, conn: Connection, engine_index: int, bucket_bytes: int):
        self._conn, self.engine_index, self._bucket_bytes = conn, engine_index, bucket_bytes
        self.version = 0
        self.last_sync: dict = {}

    def generate(self, prompt_ids, prompt_indices, settings, seeds, sink) -> None:
        conn = self._conn
        with conn.lock:
            try:
                _send(
                    ("generate", (prompt_ids, prompt_indices, settings, seeds)),
                    conn.peer,
                    conn.group,
                )
                while True:
                    status, item = _recv(conn.peer, conn.group)
                    if status == "error":
                        raise RemoteRoleError(
                            f"rank {conn.peer} (rollout engine {self.engine_index}): {item}"
                        )
                    if item == _END:
                        return
                    sink.put(item)
            except RuntimeError as e:
                if isinstance(e, RemoteRoleError):
                    raise
                raise conn._unreachable(e) from e

    def load_weights(self, named_tensors, version: int) -> None:
        packed = buckets(named_tensors, self._bucket_bytes)
        self.last_sync = self._exchange(
            ("load_weights", ([meta for meta, _ in packed], version)), [flat for _, flat in packed]
        )
        self.version = version

    def init_weight_group(self, host: str, port: int, rank_offset: int, world_size: int):
        self._exchange(("call", ("init_weight_group", (host, port, rank_offset, world_size))))

    def receive_weights(self, layout, version: int) -> None:
        self.last_sync = self._exchange(("call", ("receive_weights", (layout, version))))
        self.version = version

    def _exchange(self, message, tensors=()):
        """One command (and its tensors) to the engine's rank; returns the reply's value, the
        engine's last_sync."""
        conn = self._conn
        with conn.lock:
            try:
                _send(message, conn.peer, conn.group)
                for flat in tensors:
                    dist.send(flat, dst=conn.peer, group=conn.group)
                status, value = _recv(conn.peer, conn.group)
            except RuntimeError as e:
                raise conn._unreachable(e) from e
        if status != "ok":
            raise RemoteRoleError(f"rank {conn.peer} (rollout engine {self.engine_index}): {value}")
        return value


_ENGINE_CALLS = frozenset({"init_weight_group", "receive_weights"})


def serve_engine(engine, controller: int, group) -> None:
    """An engine rank: generate and load weights for the controller until it says stop."""

    class Stream:
        def put(self, completion):
            _send(("ok", completion), controller, group)

    while True:
        msg = _recv(controller, group)
        if msg is None:
            return
        command, payload = msg
        try:
            if command == "generate":
                engine.generate(*payload, Stream())
                reply = ("ok", _END)
            elif command == "load_weights":
                metas, version = payload
                named = []
                for dtype, entries, numel in metas:
                    flat = torch.empty(numel, dtype=dtype)
                    dist.recv(flat, src=controller, group=group)
                    named += [(n, flat[o : o + k].view(shape)) for n, shape, o, k in entries]
                engine.load_weights(named, version)
                reply = ("ok", engine.last_sync)
            elif command == "call" and payload[0] in _ENGINE_CALLS:
                method, args = payload
                getattr(engine, method)(*args)
                reply = ("ok", engine.last_sync)
            else:
                raise ValueError(f"unknown engine command {command!r}")
        except Exception as e:
            traceback.print_exc()
            reply = ("error", f"{type(e).__name__}: {e}")
        _send(reply, controller, group)


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

    def load_weights(self, named_tensors, version: int) -> None:
        named = list(named_tensors)
        self._each(lambda e, _: e.load_weights(named, version), [None] * len(self.engines))
        seconds = max(e.last_sync.get("seconds", 0.0) for e in self.engines)
        nbytes = sum(e.last_sync.get("bytes", 0) for e in self.engines)
        self.last_sync = {
            "seconds": seconds,
            "bytes": nbytes,
            "gbps": nbytes / max(seconds, 1e-9) / 1e9,
        }

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
    state is partitioned, so every rank joins training_state's gathers."""

    _ALL = ("drop_grads", "divide_grads", "apply_step", "load_training_state", "load_weights_from")
    # The NCCL weight sync talks to the first rank only (rlhf_pipe.distributed.weight_sync).
    _FIRST = ("weight_sync_address", "init_weight_sender", "weight_layout", "broadcast_weights")

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

    def prepare_step(self, grad_divisor):
        # Every rank joins the gradient all-reduce; the norms are then equal.
        return self._parallel([(c, "prepare_step", (grad_divisor,)) for c in self._conns])[0]

    def training_state(self):
        if self._zero is None:
            return self._conns[0].call(self._name, "training_state")
        # Every rank joins ZeRO's gathers; the first returns the whole (universal) state.
        return self._parallel([(c, "training_state", ()) for c in self._conns])[0]

    def save(self, out_dir):
        # ZeRO-3: every rank gathers, the first writes.
        conns = self._conns if self._zero == 3 else self._conns[:1]
        self._parallel([(c, "save", (out_dir,)) for c in conns])

    def __getattr__(self, method: str):
        if method in self._ALL:
            return lambda *args: self._parallel([(c, method, args) for c in self._conns])[0]
        if method in self._FIRST:
            return lambda *args: self._conns[0].call(self._name, method, args)
        raise AttributeError(method)

    def named_weights(self):
        if self._zero != 3:
            return iter(self._conns[0].fetch_weights(self._name))
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
                out = self._conns[0].fetch_weights(self._name)
            finally:
                for t in joins:
                    t.join()
        if errors:
            raise errors[0]
        return iter(out)


def _sum_metrics(parts: list[dict]) -> dict:
    total: dict = {}
    for part in parts:
        for k, v in part.items():
            total[k] = total[k] + v if k in total else v
    return total
