"""Every implementation of a role or engine protocol (rlhf_pipe.protocols) has each member,
with a signature that accepts the protocol's calls; the remote proxies are generated from
the protocols; the Role enum behaves as the strings it replaced."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys

import pytest

from rlhf_pipe import protocols
from rlhf_pipe.distributed import remote
from rlhf_pipe.protocols import Dispatch, Role, members
from rlhf_pipe.roles import CriticRole, PolicyRole, ReferenceRole, RewardRole
from rlhf_pipe.rollout.hf_engine import HFEngine
from rlhf_pipe.rollout.vllm_engine import VLLMEngine
from rlhf_pipe.zero import ZeroCriticRole, ZeroPolicyRole, ZeroReferenceRole, ZeroRewardRole

IMPLEMENTATIONS = {
    protocols.Policy: [
        PolicyRole,
        ZeroPolicyRole,
        remote.REMOTE_ROLE_CLASSES[Role.ACTOR],
        remote.REMOTE_GROUP_CLASSES[Role.ACTOR],
    ],
    protocols.Critic: [
        CriticRole,
        ZeroCriticRole,
        remote.REMOTE_ROLE_CLASSES[Role.CRITIC],
        remote.REMOTE_GROUP_CLASSES[Role.CRITIC],
    ],
    protocols.Reference: [
        ReferenceRole,
        ZeroReferenceRole,
        remote.REMOTE_ROLE_CLASSES[Role.REFERENCE],
        remote.REMOTE_GROUP_CLASSES[Role.REFERENCE],
    ],
    protocols.Reward: [
        RewardRole,
        ZeroRewardRole,
        remote.REMOTE_ROLE_CLASSES[Role.REWARD],
        remote.REMOTE_GROUP_CLASSES[Role.REWARD],
    ],
    protocols.RolloutEngine: [HFEngine, remote.EnginePool],
    protocols.NcclEngine: [VLLMEngine, remote.RemoteEngine],
}
CASES = [(p, impl) for p, impls in IMPLEMENTATIONS.items() for impl in impls]


def _accepts(impl_fn, proto_fn) -> str | None:
    """Why `impl_fn` cannot take every call `proto_fn` allows, or None."""
    want = list(inspect.signature(proto_fn).parameters.values())[1:]  # without self
    have = list(inspect.signature(impl_fn).parameters.values())[1:]
    if have and have[0].kind is inspect.Parameter.VAR_POSITIONAL:  # (*args, **kwargs)
        return None
    for i, p in enumerate(want):
        if i >= len(have) or have[i].name != p.name:
            return f"parameter {i + 1} should be {p.name!r}"
        if p.default is not inspect.Parameter.empty and have[i].default is inspect.Parameter.empty:
            return f"{p.name!r} needs a default"
    extra = [p for p in have[len(want) :] if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    if any(p.default is inspect.Parameter.empty for p in extra):
        return f"extra parameters without a default: {[p.name for p in extra]}"
    return None


@pytest.mark.parametrize("protocol, impl", CASES, ids=lambda x: x.__name__)
def test_each_implementation_has_every_member_of_its_protocol(protocol, impl):
    for name, member in members(protocol).items():
        if member.kind == "attribute":
            # Set in __init__: read from the source, as the class has no instance here.
            assert f"self.{name}" in inspect.getsource(impl) or hasattr(impl, name), name
            continue
        assert hasattr(impl, name), f"{impl.__name__} has no {name}"
        if member.kind == "property":
            assert isinstance(inspect.getattr_static(impl, name), property), name
            continue
        why = _accepts(getattr(impl, name), member.fn)
        assert why is None, f"{impl.__name__}.{name}: {why}"


def test_generated_proxies_take_the_protocol_signatures():
    cls = remote.REMOTE_ROLE_CLASSES[Role.ACTOR]
    assert inspect.signature(cls.ptx) == inspect.signature(protocols.Policy.ptx)
    group = remote.REMOTE_GROUP_CLASSES[Role.CRITIC]
    assert inspect.signature(group.apply_step) == inspect.signature(protocols.Critic.apply_step)


def test_the_dispatch_tables_are_the_ones_kept_by_hand_before():
    policy = protocols.Policy
    assert set(protocols.dispatched(policy, Dispatch.ALL)) == {
        "drop_grads",
        "divide_grads",
        "apply_step",
        "load_training_state",
        "load_weights_from",
        "prepare_step",  # an explicit every-rank method of the group before
    }
    assert set(protocols.dispatched(policy, Dispatch.FIRST)) == {
        "weight_sync_address",
        "init_weight_sender",
        "weight_layout",
        "snapshot_weights",
        "broadcast_weights",
    }
    everything = set().union(*(remote.REMOTE_METHODS[r] for r in protocols.MODEL_ROLES))
    assert everything == {
        "logprobs",
        "values",
        "scores",
        "names",  # read by the trainer for the reward/<name> metrics
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
        "named_weights",
        "weight_sync_address",
        "init_weight_sender",
        "weight_layout",
        "snapshot_weights",
        "broadcast_weights",
        "join_weights",
    }
    # Every GROUP member is written out in RemoteRoleGroup, not generated.
    for role in protocols.MODEL_ROLES:
        for name in protocols.dispatched(protocols.PROTOCOLS[role], Dispatch.GROUP):
            assert name in vars(remote.RemoteRoleGroup), name


def test_role_is_the_string_it_replaced():
    assert Role.ACTOR == "actor" and {"actor": 1}[Role.ACTOR] == 1
    assert f"{Role.CRITIC}" == str(Role.CRITIC) == "critic"
    assert json.dumps({Role.REWARD: [Role.ROLLOUT]}) == '{"reward": ["rollout"]}'
    assert [r.config_key for r in Role] == ["policy", "policy", "critic", "reference", "reward"]
    assert Role("reference") is Role.REFERENCE


def test_protocols_import_without_torch():
    code = "import sys, rlhf_pipe.protocols; assert 'torch' not in sys.modules"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
