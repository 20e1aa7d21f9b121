"""The seams of the trainer: the model roles and the rollout engine, as `typing.Protocol`s.

Implementations in this process: rlhf_pipe.roles and rlhf_pipe.zero (roles),
rlhf_pipe.rollout (engines). On other ranks: the proxies of rlhf_pipe.distributed.remote,
which are derived from the protocols here, not kept in step by hand. Each member carries a
`remote(...)` marker saying how a call crosses ranks:

    Dispatch.GROUP  RemoteRoleGroup has its own method (samples dealt over the data-parallel
                    ranks, or ZeRO's rules for which ranks join)
    Dispatch.ALL    every rank of the role, the first rank's answer returned
    Dispatch.FIRST  the first rank alone
    Dispatch.PEER   sent by a RemoteRoleGroup to its other ranks, not called by the trainer
    Dispatch.LOCAL  answered by the proxy on the controller, never sent

`tensors_in` / `tensors_out`: the first argument / the result is a sequence of named tensors,
sent as flat buckets (rlhf_pipe.distributed.buckets), not pickled. `streams`: the last
argument is a sink; every `put` on the serving rank travels back as one reply.

Imports neither torch nor vLLM: annotations are strings, read by type checkers only.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

if TYPE_CHECKING:
    from torch import Tensor

    from rlhf_pipe.pipeline.batch import Sample
    from rlhf_pipe.roles import LossSettings
    from rlhf_pipe.rollout.types import Completion, SamplingSettings


class Role(str, enum.Enum):
    """A role of the placement; the values are the names used in configs, logs and JSON."""

    ROLLOUT = "rollout"  # the generation engines
    ACTOR = "actor"
    CRITIC = "critic"
    REFERENCE = "reference"
    REWARD = "reward"

    __str__ = str.__str__  # str(role) and f"{role}" are the bare name, as with StrEnum

    @property
    def config_key(self) -> str:
        """The model_configs entry behind the role: the policy is the actor and the rollout."""
        return "policy" if self in (Role.ROLLOUT, Role.ACTOR) else self.value


# The roles that are models in the trainer (the rollout is the engine), in placement order.
MODEL_ROLES: tuple[Role, ...] = (Role.ACTOR, Role.CRITIC, Role.REFERENCE, Role.REWARD)
TRAINING_ROLES: tuple[Role, ...] = (Role.ACTOR, Role.CRITIC)


class Dispatch(str, enum.Enum):
    GROUP = "group"
    ALL = "all"
    FIRST = "first"
    PEER = "peer"
    LOCAL = "local"


@dataclass(frozen=True)
class Remote:
    dispatch: Dispatch
    tensors_in: bool = False
    tensors_out: bool = False
    streams: bool = False


_F = TypeVar("_F", bound=Callable[..., Any])
_MARK = "__rlhf_pipe_remote__"


def remote(
    dispatch: Dispatch,
    *,
    tensors_in: bool = False,
    tensors_out: bool = False,
    streams: bool = False,
) -> Callable[[_F], _F]:
    """Mark a protocol member with how it crosses ranks (see the module docstring)."""

    def mark(fn: _F) -> _F:
        setattr(fn, _MARK, Remote(dispatch, tensors_in, tensors_out, streams))
        return fn

    return mark


# (call seconds, seconds of them inside the method on the role's rank), or None for a role in
# this process, which has no transport to time.
CallSeconds = tuple[float, float]


class RoleBase(Protocol):
    @remote(Dispatch.LOCAL)
    def take_call_seconds(self) -> CallSeconds | None:
        """This role's calls since the last take (roles on other ranks; None here)."""
        ...


class Reference(RoleBase, Protocol):
    @remote(Dispatch.GROUP)
    def logprobs(self, samples: list[Sample]) -> list[Tensor]:
        """(num_actions,) log-probs of each sample's response tokens."""
        ...


class Trainable(RoleBase, Protocol):
    """What the Train stage and the checkpoint code call on the actor and the critic."""

    @remote(Dispatch.GROUP)
    def train(self, samples: list[Sample], loss: LossSettings, num_samples: int) -> dict:
        """Forward and backward over `samples`; gradients accumulate. Detached metric sums."""
        ...

    @remote(Dispatch.ALL)
    def prepare_step(self, grad_divisor: float) -> Tensor | None:
        """Divide the summed gradients and clip; the pre-clip norm (None: nothing to update)."""
        ...

    @remote(Dispatch.ALL)
    def apply_step(self, norm: Tensor) -> dict: ...

    @remote(Dispatch.ALL)
    def drop_grads(self) -> None: ...

    @remote(Dispatch.ALL)
    def divide_grads(self, divisor: float) -> None: ...

    @remote(Dispatch.GROUP)
    def save(self, out_dir: str) -> None: ...

    @remote(Dispatch.GROUP)
    def training_state(self) -> dict: ...

    @remote(Dispatch.ALL)
    def load_training_state(self, state: dict) -> None: ...

    @remote(Dispatch.ALL)
    def load_weights_from(self, folder: str) -> None: ...


class Policy(Trainable, Protocol):
    """The actor."""

    @remote(Dispatch.GROUP)
    def logprobs(self, samples: list[Sample]) -> list[Tensor]: ...

    @remote(Dispatch.GROUP)
    def ptx(self, token_ids: list[list[int]], weight: float, total: int | None = None) -> dict: ...

    @remote(Dispatch.GROUP, tensors_out=True)
    def named_weights(self) -> Iterator[tuple[str, Tensor]]:
        """The weights the rollout engines load (HF names; a LoRA adapter in 'adapter' sync)."""
        ...

    @remote(Dispatch.PEER)
    def join_weights(self) -> None:
        """ZeRO-3, a rank other than the first: join the gathers of the first's
        named_weights. A no-op where the weights are not partitioned."""
        ...

    # The direct weight sync (rlhf_pipe.distributed.weight_sync: NCCL, or gloo on the CPU)
    # talks to the first rank only.
    @remote(Dispatch.FIRST)
    def weight_sync_address(self) -> tuple[str, int]: ...

    @remote(Dispatch.FIRST)
    def init_weight_sender(
        self, host: str, port: int, world_size: int, backend: str, timeout_s: float
    ) -> None:
        """Rank 0 of the sync group; `backend` 'nccl' or 'gloo'."""
        ...

    @remote(Dispatch.FIRST)
    def weight_layout(self, bucket_bytes: int) -> list: ...

    @remote(Dispatch.FIRST)
    def snapshot_weights(self, version: int) -> None:
        """Run-ahead: keep a copy of the current weights as `version`, on the actor's device,
        until `broadcast_weights(layout, version)` sends it."""
        ...

    @remote(Dispatch.FIRST)
    def broadcast_weights(self, layout: list, version: int | None = None) -> int:
        """Broadcast the live weights (version None) or the snapshot of `version`, which is
        then dropped with any older one; the bytes sent."""
        ...


class Critic(Trainable, Protocol):
    @remote(Dispatch.GROUP)
    def values(self, samples: list[Sample]) -> list[Tensor]:
        """(num_actions,) value of each response token."""
        ...


class Reward(RoleBase, Protocol):
    @remote(Dispatch.GROUP)
    def scores(self, samples: list[Sample]) -> list[Tensor]:
        """(1 + K,) per sample: the weighted total, then each scorer's own score."""
        ...

    @property
    @remote(Dispatch.FIRST)
    def names(self) -> list[str]:
        """The K scorer names, in `scores` order."""
        ...

    @remote(Dispatch.LOCAL)
    def set_function(self, fn: Callable[[list[str], list[str]], list[float]]) -> None:
        """Score with a Python function instead of the configured rule functions (in this
        process only: a function does not travel to another rank)."""
        ...


# ----------------------------------------------------------------------------- engines


class CompletionSink(Protocol):
    def put(self, item: Completion) -> None: ...


class RolloutEngine(Protocol):
    """vLLM or transformers generation, in this process, on another rank, or a pool of them."""

    version: int  # policy version of the weights it serves
    last_sync: dict  # {seconds, bytes, gbps} of the last weight load; {} before the first

    @remote(Dispatch.FIRST, streams=True)
    def generate(
        self,
        prompt_ids: list[list[int]],
        prompt_indices: list[int],
        settings: SamplingSettings,
        seeds: list[int],
        sink: CompletionSink,
    ) -> None:
        """Generate for every prompt; `sink.put` each Completion as soon as it is finished."""
        ...

    @remote(Dispatch.FIRST, tensors_in=True)
    def load_weights(self, named_tensors: Iterable[tuple[str, Tensor]], version: int) -> dict:
        """Load the actor's weights (HF names); returns the sync's stats, kept as last_sync."""
        ...


class NcclEngine(RolloutEngine, Protocol):
    """A vLLM engine that also takes the actor's weights straight from its rank, over NCCL
    or gloo (rollout/nccl_sync.py)."""

    @remote(Dispatch.FIRST)
    def init_weight_group(
        self,
        host: str,
        port: int,
        rank_offset: int,
        world_size: int,
        backend: str,
        timeout_s: float,
    ) -> None: ...

    @remote(Dispatch.FIRST)
    def receive_weights(self, layout: list, version: int) -> dict: ...


class WeightSync(Protocol):
    """The actor's weights into every engine by another path than `engine.load_weights`
    (the direct broadcast from the actor's rank); each sync returns its stats."""

    def __call__(self, version: int) -> dict:
        """The actor's live weights, as `version`."""
        ...

    def snapshot(self, version: int) -> None:
        """Run-ahead: keep the actor's current weights as `version` on its own device."""
        ...

    def send_snapshot(self, version: int) -> dict:
        """Run-ahead: the snapshot of `version` into every engine (the engines idle)."""
        ...


# The protocol of each role; the rollout entry is what an engine rank serves.
PROTOCOLS: dict[Role, type] = {
    Role.ACTOR: Policy,
    Role.CRITIC: Critic,
    Role.REFERENCE: Reference,
    Role.REWARD: Reward,
    Role.ROLLOUT: NcclEngine,
}


# ----------------------------------------------------------------------------- introspection


@dataclass(frozen=True)
class Member:
    name: str
    kind: str  # "method" | "property" | "attribute"
    remote: Remote
    fn: Callable[..., Any] | None  # the protocol's function (the getter of a property)


def members(protocol: type) -> dict[str, Member]:
    """The public members of `protocol` and its base protocols, by name. An attribute (an
    annotation only) is answered by the proxy: LOCAL."""
    out: dict[str, Member] = {}
    for cls in reversed(protocol.__mro__):
        if cls is object or cls is Protocol or not getattr(cls, "_is_protocol", False):
            continue
        for name in getattr(cls, "__annotations__", {}):
            if not name.startswith("_"):
                out[name] = Member(name, "attribute", Remote(Dispatch.LOCAL), None)
        for name, value in vars(cls).items():
            if name.startswith("_"):
                continue
            kind, fn = (
                ("property", value.fget) if isinstance(value, property) else ("method", value)
            )
            if callable(fn):
                out[name] = Member(name, kind, getattr(fn, _MARK), fn)
    return out


def remote_methods(protocol: type) -> frozenset[str]:
    """What a serving rank answers for an object of `protocol`: every member that is sent."""
    return frozenset(n for n, m in members(protocol).items() if m.remote.dispatch != Dispatch.LOCAL)


def dispatched(protocol: type, dispatch: Dispatch) -> tuple[str, ...]:
    return tuple(sorted(n for n, m in members(protocol).items() if m.remote.dispatch == dispatch))
