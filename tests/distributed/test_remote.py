"""The RPC layer (rlhf_pipe.distributed.remote) in one process: the real serve loop and the
real proxies over LoopbackTransport, with real roles on the tiny models. The proxies must
answer as the local objects do; the torchrun tests cover the gloo transport."""

from __future__ import annotations

import threading

import pytest
import torch

from rlhf_pipe.assets.tiny import digit_reward
from rlhf_pipe.distributed.remote import (
    Connection,
    EnginePool,
    LoopbackTransport,
    RemoteEngine,
    RemoteRoleError,
    remote_role,
    remote_role_group,
    serve,
)
from rlhf_pipe.models import load_causal_lm, load_tokenizer
from rlhf_pipe.pipeline.batch import Sample
from rlhf_pipe.protocols import Role
from rlhf_pipe.roles import LossSettings, PolicyRole, RewardRole, Scorer
from rlhf_pipe.rollout.hf_engine import HFEngine
from rlhf_pipe.rollout.types import SamplingSettings

BUCKET = 4096  # bytes: the tiny policy's weights take several buckets
LOSS = LossSettings(0.2, None, 1.0, 1.0, "token_mean")


def _policy(path) -> PolicyRole:
    torch.manual_seed(0)
    model = load_causal_lm(str(path), "float32", False, "policy")
    return PolicyRole(
        model,
        0,
        lr=1e-3,
        betas=(0.9, 0.95),
        eps=1e-8,
        weight_decay=0.0,
        warmup_steps=0,
        max_grad_norm=1.0,
        infer_micro_bs=2,
        train_micro_bs=2,
    )


def _samples(tok, n=5) -> list[Sample]:
    out = []
    for i in range(n):
        prompt = tok(f"question {i}", add_special_tokens=False)["input_ids"]
        answer = tok(f"{i} answer {'x' * i}", add_special_tokens=False)["input_ids"]
        s = Sample(i, i, 0, torch.tensor(prompt), torch.tensor(answer), f"q{i}", f"a{i}")
        s.advantages = torch.linspace(-1, 1, len(answer))
        out.append(s)
    return out


class _Rank:
    """A serving 'rank': the serve loop in a thread, the controller's Connection to it."""

    def __init__(self, targets: dict, peer: int = 1, timeout_s: float = 30.0):
        here, there = LoopbackTransport.pair(timeout_s)
        self.conn = Connection(here, peer, tuple(targets))
        self.errors: list[BaseException] = []
        self.thread = threading.Thread(target=self._serve, args=(targets, there), daemon=True)
        self.thread.start()

    def _serve(self, targets, transport) -> None:
        try:
            serve(targets, transport, BUCKET)
        except BaseException as e:  # the test fails on it below
            self.errors.append(e)

    def close(self) -> None:
        self.conn.close()
        self.thread.join(10)
        assert not self.thread.is_alive() and not self.errors


@pytest.fixture(scope="module")
def tok(tiny_assets):
    return load_tokenizer(str(tiny_assets.policy))


def test_a_remote_actor_answers_as_the_local_one(tiny_assets, tok):
    local, served = _policy(tiny_assets.policy), _policy(tiny_assets.policy)
    rank = _Rank({Role.ACTOR: served})
    actor = remote_role(rank.conn, Role.ACTOR)
    samples = _samples(tok)

    want, got = local.logprobs(samples), actor.logprobs(samples)
    assert len(got) == len(samples)
    assert all(torch.equal(a, b) for a, b in zip(want, got))
    for s, lp in zip(samples, want):
        s.old_logp = lp
    want_m = local.train(samples, LOSS, len(samples))
    got_m = actor.train(samples, LOSS, len(samples))
    assert want_m.keys() == got_m.keys()
    assert all(torch.equal(want_m[k], got_m[k]) for k in want_m)
    norm = actor.prepare_step(float(want_m["tokens"]))
    assert torch.equal(norm, local.prepare_step(float(want_m["tokens"])))
    assert actor.apply_step(norm)["lr"] == local.apply_step(norm)["lr"]

    # The weights come back in buckets, every tensor exactly, in state_dict order.
    sent = list(actor.named_weights())
    mine = list(local.named_weights())
    assert [n for n, _ in sent] == [n for n, _ in mine]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(sent, mine))
    # The direct sync's layout (a list of Bucket NamedTuples) crosses as it is.
    assert actor.weight_layout(BUCKET) == local.weight_layout(BUCKET)

    call_s, on_rank_s = actor.take_call_seconds()
    assert call_s >= on_rank_s > 0
    assert actor.take_call_seconds() == (0.0, 0.0)  # taken
    rank.close()


def test_errors_name_the_rank_and_role_and_the_loop_goes_on(tiny_assets, tok):
    rank = _Rank({Role.REWARD: RewardRole([Scorer("digits", 1.0, "function", digit_reward)], 0, 2)})
    reward = remote_role(rank.conn, Role.REWARD)
    assert reward.names == ["digits"]  # a property of the protocol, read on the rank
    with pytest.raises(RemoteRoleError, match=r"rank 1 \(reward\): AttributeError"):
        reward.scores(["not a sample"])
    # Not in the Reward protocol: refused on the rank, though the object has it.
    with pytest.raises(RemoteRoleError, match="no remote method 'scorers'"):
        rank.conn.call(Role.REWARD, "scorers")
    with pytest.raises(TypeError, match="cannot go to another rank"):
        reward.set_function(digit_reward)
    samples = _samples(tok, 3)
    assert torch.stack(reward.scores(samples)).shape == (3, 2)  # still answering
    rank.close()


def test_a_silent_peer_is_unreachable_not_a_hang():
    here, _ = LoopbackTransport.pair(timeout_s=0.2)
    conn = Connection(here, 7, ("critic",))
    with pytest.raises(RemoteRoleError, match=r"rank 7 \(critic\) unreachable"):
        remote_role(conn, Role.CRITIC).values([])


def test_a_group_deals_chunks_over_its_ranks_and_reassembles_them(tiny_assets, tok):
    local = _policy(tiny_assets.policy)
    ranks = [_Rank({Role.ACTOR: _policy(tiny_assets.policy)}, peer=p) for p in (1, 2)]
    group = remote_role_group([r.conn for r in ranks], Role.ACTOR, 2, 2)
    samples = _samples(tok, 5)
    got = group.logprobs(samples)
    assert all(torch.equal(a, b) for a, b in zip(local.logprobs(samples), got))
    # Chunks of 2 dealt round-robin: rank 1 has chunks 0 and 2 (3 samples), rank 2 one.
    assert ranks[0].conn.take_seconds(Role.ACTOR)[1] > 0
    assert ranks[1].conn.take_seconds(Role.ACTOR)[1] > 0
    group.drop_grads()  # Dispatch.ALL: both ranks answer
    host, port = group.weight_sync_address()  # Dispatch.FIRST
    assert isinstance(host, str) and port > 0
    for r in ranks:
        r.close()


def test_a_remote_engine_streams_completions_and_loads_bucketed_weights(tiny_assets, tok):
    def engine():
        torch.manual_seed(0)
        model = load_causal_lm(str(tiny_assets.policy), "float32", False, "policy")
        return HFEngine(model, 0, tok.eos_token_id, chunk_size=2)

    local = engine()
    rank = _Rank({Role.ROLLOUT: engine()})
    pool = EnginePool([RemoteEngine(rank.conn, 1, BUCKET)])
    prompts = [tok(f"question {i}", add_special_tokens=False)["input_ids"] for i in range(3)]
    settings = SamplingSettings(max_new_tokens=4, temperature=0.0)
    want, got = [], []
    local.generate(prompts, [0, 1, 2], settings, [1, 2, 3], type("S", (), {"put": want.append}))
    pool.generate(prompts, [0, 1, 2], settings, [1, 2, 3], type("S", (), {"put": got.append}))
    assert [(c.sample_id, c.response_ids) for c in got] == [
        (c.sample_id, c.response_ids) for c in want
    ]

    weights = {n: torch.full_like(t, 0.5) for n, t in local.model.state_dict().items()}
    stats = pool.load_weights(weights.items(), version=3)
    assert pool.version == 3 and stats["bytes"] == sum(
        t.numel() * t.element_size() for t in weights.values()
    )
    local.load_weights(weights.items(), 3)
    again = []
    pool.generate(prompts, [0, 1, 2], settings, [1, 2, 3], type("S", (), {"put": again.append}))
    assert {c.version for c in again} == {3}
    with pytest.raises(RemoteRoleError, match=r"rank 1 \(rollout engine 1\): ValueError"):
        pool.generate(prompts, [0], SamplingSettings(4, stop=("x",)), [1], None)
    rank.close()
