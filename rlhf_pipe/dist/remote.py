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

import threading
import traceback

import torch
import torch.distributed as dist

# Methods a remote role answers; anything else is an AttributeError on the proxy, so that
# `getattr(role, "model", None)` and the like behave as for a missing attribute.
REMOTE_METHODS = frozenset({
    "logprobs", "values", "scores", "train", "ptx", "prepare_step", "apply_step", "drop_grads",
    "divide_grads", "save", "training_state", "load_training_state", "load_weights_from"})
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

    def _unreachable(self, e: Exception) -> RemoteRoleError:
        return RemoteRoleError(f"rank {self.peer} ({'+'.join(self.roles)}) unreachable: "
                               f"{' '.join(str(e).split())[:300]}")

    def call(self, role: str, method: str, args=(), kwargs=None):
        with self.lock:
            try:
                _send((role, method, args, kwargs or {}), self.peer, self.group)
                status, value = _recv(self.peer, self.group)
            except RuntimeError as e:  # gloo: peer closed the connection, or timed out
                raise self._unreachable(e) from e
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
                        out.append((name, flat[offset:offset + size].view(shape)))
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


def serve(roles: dict, controller: int, group, bucket_bytes: int) -> None:
    """Answer the controller's calls until it says stop (None)."""
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
            reply = ("ok", _to_cpu(getattr(roles[role], method)(*args, **kwargs)))
        except Exception as e:  # reported on the controller, which stops the run
            traceback.print_exc()
            reply = ("error", f"{type(e).__name__}: {e}")
        _send(reply, controller, group)
