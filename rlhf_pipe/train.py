"""`torchrun --nproc-per-node P [--nnodes N --rdzv-endpoint ...] -m rlhf_pipe.train CONFIG`.

Every rank computes the same placement from the config (rlhf_pipe.placement) and checks it
against WORLD_SIZE. The rank that leads vLLM engine 0 is the controller: it runs the trainer
with its stage threads and the engine; every other rank that hosts roles builds them and
answers the controller's calls (rlhf_pipe.distributed.remote). Without torchrun (WORLD_SIZE 1)
this is `rlhf-pipe train`.

A failure on any rank prints one line naming the rank, its roles and the first error, and the
rank exits non-zero; torchrun then stops the others. Every collective has a timeout
(train_config.stage_timeout_s), so a peer that dies silently is an error, not a hang.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from datetime import timedelta

from rlhf_pipe.protocols import MODEL_ROLES, Role
from rlhf_pipe.run_args import UserError, user_errors

# By name: run as `python -m rlhf_pipe.train`, __name__ is "__main__", outside the "rlhf_pipe"
# logger that the console set-up routes (rlhf_pipe/console.py).
logger = logging.getLogger("rlhf_pipe.train")


def _parse(argv):
    from rlhf_pipe.bench_cli import _staleness
    from rlhf_pipe.run_args import add_run_arguments

    p = argparse.ArgumentParser(prog="python -m rlhf_pipe.train")
    add_run_arguments(p)
    # The distributed form of `rlhf-pipe bench` (see rlhf_pipe/bench.py): one launch, the
    # roles built once, each PIPE_MICRO_BATCH_NUM run in turn on the same ranks.
    p.add_argument("--bench", metavar="M1,M2,...", help="bench these PIPE_MICRO_BATCH_NUM values")
    p.add_argument(
        "--staleness",
        type=_staleness,
        default=[0],
        metavar="S1,S2,...",
        help="bench: train_config.max_staleness values; each s >= 1 reruns every M with "
        "run-ahead generation (0 is added if missing; default 0)",
    )
    p.add_argument("--steps", type=int, default=3, help="bench: measured steps per M")
    p.add_argument("--warmup", type=int, default=1, help="bench: warm-up steps per M")
    p.add_argument("--out", help="bench: output folder")
    p.add_argument(
        "--streaming-rounds",
        type=int,
        default=3,
        help="bench: A B B A rounds of the streaming-overhead measurement",
    )
    p.add_argument(
        "--no-streaming",
        action="store_true",
        help="bench: skip the generate_to_queue vs generate measurement",
    )
    return p.parse_args(argv)


def _role_ranks(placement) -> dict[Role, list[int]]:
    out = {}
    for role in MODEL_ROLES:
        try:
            ranks = placement.ranks_of(role)
        except ValueError:
            continue  # e.g. a reward given only as a function: it has no ranks
        if ranks:
            out[role] = ranks
    return out


def run(args) -> int:
    """The one launcher path: `rlhf-pipe train` calls this in its own process (WORLD_SIZE 1),
    and torchrun (directly, or through `rlhf-pipe train --nproc`) on every rank."""
    # First, before the config loads: this imports multiprocessing.util, whose exit hook
    # (join every child) must be registered before weakref.finalize's (vLLM's engine shutdown).
    # Hooks run last-in first-out; the other order leaves a torchrun rank waiting at exit for
    # its engine core forever.
    import torch.distributed  # noqa: F401

    from rlhf_pipe.console import quiet_console
    from rlhf_pipe.run_args import load_run_config
    from rlhf_pipe.versions import warn_untested_vllm

    cfg = load_run_config(args)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    if world == 1 and args.bench:
        raise UserError("--bench: needs torchrun; in one process use `rlhf-pipe bench`")
    if getattr(args, "staleness", [0]) != [0] and not args.bench:  # rlhf-pipe train has none
        raise UserError("--staleness: a bench option; with --bench M1,M2,...")
    if not args.resume and not args.bench:
        from rlhf_pipe.run_dir import refuse_a_fresh_run

        refuse_a_fresh_run(cfg.train_config.work_dir)  # before 20 s of building models
    deepspeed = bool(_zero_stages(cfg))
    with quiet_console(cfg.train_config.work_dir, rank, args.verbose, deepspeed) as log_file:
        if rank == 0:
            warn_untested_vllm()
        if world == 1:
            return _run_one_process(cfg, args, log_file)
        return _run_ranks(cfg, args, world, rank)


def _run_one_process(cfg, args, log_file) -> int:
    from rlhf_pipe.report import summary_lines
    from rlhf_pipe.run_args import apply_resume
    from rlhf_pipe.trainer import RLHFTrainer

    trainer = RLHFTrainer(cfg)
    try:
        _report_resume(args.resume, apply_resume(trainer, args.resume), trainer)
        history = trainer.learn()
    finally:
        trainer.close()
    if not history:
        print("nothing to train: max_train_step already reached")
        return 0
    for line in summary_lines(history):
        print(line)
    print(f"metrics: {trainer.logger.jsonl_path} (plots: rlhf-pipe report {trainer.work_dir})")
    print(f"logs: {log_file}")
    return 0


def _report_resume(spec, checkpoint, trainer) -> None:
    if checkpoint is not None:
        print(f"resumed from {checkpoint} (step {trainer.step_index})", flush=True)
    elif spec:
        print(f"--resume auto: no checkpoint in {trainer.work_dir}; starting fresh", flush=True)


def _run_ranks(cfg, args, world, rank) -> int:
    import torch.distributed as dist

    from rlhf_pipe.placement import check, errors, make_placement

    placement = make_placement(cfg)
    # The layout checks need torchrun's WORLD_SIZE, so they run here, not at load
    # (rlhf_pipe.validation's module docstring lists every check kept out of it).
    problems = errors(placement, check(placement, world))
    if problems:
        raise UserError(problems[0])
    role_ranks = _role_ranks(placement)
    controller = placement.engines[0][0]
    for role, ranks in role_ranks.items():
        if len(ranks) > 1 and controller in ranks:
            raise UserError(
                f"{args.config}: placement: {role} has data-parallel size "
                f"{len(ranks)} and shares the controller's rank; not supported"
            )
    engine_leaders = [group[0] for group in placement.engines[1:]]
    for leader in engine_leaders:
        if any(r in MODEL_ROLES for r in placement.roles_of(leader)):
            raise UserError(
                f"{args.config}: placement: rank {leader} leads a vLLM engine and "
                f"hosts {placement.roles_of(leader)}; colocating roles with "
                f"engines other than engine 0 is not supported yet"
            )
    roles_here = placement.roles_of(rank)
    _CURRENT.update(placement=placement, controller=controller, world=world)
    torchrun = "TORCHELASTIC_RUN_ID" in os.environ
    several_nodes = torchrun and int(os.environ["LOCAL_WORLD_SIZE"]) < world
    if torchrun:
        from rlhf_pipe.distributed import guard

        what = f"rank {rank} ({'+'.join(roles_here) or 'no role'})"
        guard.exit_with_agent(what)
        if several_nodes:
            guard.sigterm_grace(what, _lost_store)
    if rank == controller:
        # torchrun's failure summary names a dead rank by number; this line gives its role.
        logger.info(
            "rlhf_pipe placement: %s",
            ", ".join(f"rank {r} {'+'.join(placement.roles_of(r))}" for r in range(world)),
        )
    timeout = timedelta(seconds=cfg.train_config.stage_timeout_s)
    # vLLM's workers must be spawned, not forked, once CUDA is initialised (DESIGN.md).
    os.environ.setdefault("VLLM_WORKER_MULTIPROC_METHOD", "spawn")
    dist.init_process_group("gloo", timeout=timeout)
    if several_nodes:
        _CURRENT["store"] = guard.rendezvous_store()  # a collective
    # Every rank creates every group, in the same order (a collective call).
    peers = sorted(
        ({r for ranks in role_ranks.values() for r in ranks} | set(engine_leaders)) - {controller}
    )
    groups = {peer: dist.new_group([controller, peer], timeout=timeout) for peer in peers}
    # DeepSpeed roles get a group even on one rank: DeepSpeed must not take the world.
    zero = _zero_stages(cfg)
    dp_groups = {
        role: dist.new_group(ranks, timeout=timeout)
        for role, ranks in role_ranks.items()
        if len(ranks) > 1 or role in zero
    }
    _CURRENT["roles"] = roles_here
    if rank == controller:
        from rlhf_pipe.distributed import guard

        guard.start()  # vLLM's engine core must not outlive a killed controller
    try:
        if rank == controller:
            _run_controller(
                cfg,
                args,
                placement,
                role_ranks,
                controller,
                groups,
                engine_leaders,
                {r: g for r, g in dp_groups.items() if controller in role_ranks[r]},
            )
        elif rank in engine_leaders:
            _run_engine(cfg, placement, rank, controller, groups[rank])
        elif rank in groups:
            _run_roles(
                cfg,
                placement,
                rank,
                controller,
                groups[rank],
                {role: g for role, g in dp_groups.items() if rank in role_ranks[role]},
            )
        dist.barrier()
    finally:
        dist.destroy_process_group()
    return 0


def _run_controller(
    cfg, args, placement, role_ranks, controller, groups, engine_leaders, dp_groups
) -> None:
    from rlhf_pipe.builders import build_engine
    from rlhf_pipe.distributed.remote import (
        Connection,
        GlooTransport,
        remote_role,
        remote_role_group,
    )
    from rlhf_pipe.models import load_tokenizer
    from rlhf_pipe.trainer import RLHFTrainer, build_roles, build_vllm_engine

    tok_path = cfg.tokenizer_config.tokenizer_path or cfg.model_configs.policy.model_path
    tokenizer = load_tokenizer(tok_path, cfg.tokenizer_config.trust_remote_code)
    pad_id = tokenizer.pad_token_id
    conns = {
        peer: Connection(GlooTransport(peer, group), peer, placement.roles_of(peer))
        for peer, group in groups.items()
    }
    local = [r for r in MODEL_ROLES if r not in role_ranks or role_ranks[r] == [controller]]
    roles = build_roles(cfg, local, pad_id, _device(cfg, placement), dp_groups=dp_groups)
    t = cfg.train_config
    for role, ranks in role_ranks.items():
        if len(ranks) > 1:
            roles[role] = remote_role_group(
                [conns[r] for r in ranks],
                role,
                t.infer_micro_bs,
                t.train_micro_bs,
                _zero_stages(cfg).get(role),
            )
        elif ranks != [controller]:
            roles[role] = remote_role(conns[ranks[0]], role)
    bucket = cfg.train_config.weight_bucket_mb * 2**20
    direct = _direct_sync(cfg, placement, role_ranks)
    if cfg.plan.generator.generator_type == "hf":
        # The placement put the rollout on the actor's one rank, this one: a copy of the
        # local actor's module generates, as in one process.
        engines = [build_engine(cfg, roles[Role.ACTOR], tokenizer)]
    else:
        engines = [
            build_vllm_engine(
                cfg,
                0,
                in_process=False,
                weight_receiver=direct is not None,
                visible_devices=_engine_gpus(cfg, placement, controller),
            )
        ]
    if engine_leaders:
        from rlhf_pipe.distributed.remote import RemoteEngine

        engines += [
            RemoteEngine(conns[leader], i + 1, bucket) for i, leader in enumerate(engine_leaders)
        ]
    if len(engines) > 1:
        from rlhf_pipe.distributed.remote import EnginePool

        engine = EnginePool(engines)
    else:
        engine = engines[0]
    weight_sync = None
    if direct is not None:
        from rlhf_pipe.distributed.weight_sync import DirectWeightSync

        weight_sync = DirectWeightSync(
            roles[Role.ACTOR],
            engines,
            [len(g) for g in placement.engines],
            bucket,
            t.stage_timeout_s,
            direct,
        )
    trainer = RLHFTrainer(
        cfg, roles=roles, engine=engine, in_process_engine=False, weight_sync=weight_sync
    )
    logger.info(
        "rlhf_pipe weight sync: %s", {None: "gloo", "gloo": "gloo_direct"}.get(direct, direct)
    )
    try:
        from rlhf_pipe.run_args import apply_resume

        _report_resume(args.resume, apply_resume(trainer, args.resume), trainer)
        if args.bench:
            _bench(args, trainer, placement)
            return
        history = trainer.learn()
        if history:
            from rlhf_pipe.report import summary_lines

            print(
                f"rank {controller}: trained to step {trainer.step_index}, last reward "
                f"{history[-1]['reward']:.4f}",
                flush=True,
            )
            for line in summary_lines(history):
                print(line, flush=True)
    finally:
        trainer.close()
        for conn in conns.values():
            conn.close()


def _bench(args, trainer, placement) -> None:
    import shlex

    from rlhf_pipe.bench import (
        STREAMING_PENDING,
        _streaming_for,
        _with_serial,
        add_staleness,
        add_streaming,
        measure_pipes,
        skipped_streaming,
        stop_run_ahead,
        write_bench,
    )
    from rlhf_pipe.bench_cli import _pipes
    from rlhf_pipe.run_args import overrides as run_overrides

    # The run's own flags (--work-dir, --max-steps) are kept; --pipe and --staleness are the
    # bench's to vary.
    overrides = {k: v for k, v in run_overrides(args).items() if k != "PIPE_MICRO_BATCH_NUM"}
    pipes = _with_serial(_pipes(args.bench), print)
    staleness = args.staleness
    if len(staleness) > 1:
        overrides["train_config.max_staleness"] = 0  # the s=0 runs, whatever the config says

    def trainer_for(cfg):
        # Roles, engines and the sync group stay; the step plan (micro-batch size) and
        # max_staleness change, so the last run's generation thread stops first.
        stop_run_ahead(trainer)
        trainer.cfg = cfg
        return trainer

    world = int(os.environ["WORLD_SIZE"])
    device_roles = _device_roles(trainer.cfg, placement)
    gpus = world if "cpu" in device_roles else len({_gpu_of(trainer.cfg, r) for r in range(world)})
    runs, timelines, cfg, _ = measure_pipes(
        args.config,
        pipes,
        args.steps,
        args.warmup,
        overrides,
        trainer_for,
        devices=gpus,
        device_roles=device_roles,
    )
    result = write_bench(
        args.config,
        cfg,
        runs,
        timelines,
        skipped_streaming(
            cfg.plan.generator.generator_type,
            "skipped (--no-streaming)" if args.no_streaming else STREAMING_PENDING,
        ),
        args.out,
        devices=gpus,
        processes=f"torchrun, {world} ranks",
        command=shlex.join(
            ["torchrun", f"--nproc-per-node={world}", "-m", "rlhf_pipe.train"] + sys.argv[1:]
        ),
        steps=args.steps,
        warmup=args.warmup,
    )
    if len(staleness) > 1:
        ahead, spans = {0: runs}, {}
        for s in staleness[1:]:
            spans[s] = {}
            ahead[s], _, _, _ = measure_pipes(
                args.config,
                pipes,
                args.steps,
                args.warmup,
                {**overrides, "train_config.max_staleness": s},
                trainer_for,
                devices=gpus,
                device_roles=device_roles,
                spans=spans[s],
            )
        result = add_staleness(result, ahead, spans, args.warmup)
        stop_run_ahead(trainer)  # the streaming check drives the engine itself
    if not args.no_streaming:
        print(f"bench: runs written to {result['out_dir']}; measuring streaming", flush=True)
        result = add_streaming(result, _streaming_for(trainer, args.streaming_rounds))
    for m, run in result["runs"].items():
        print(
            f"pipe {m}: step {run['step_s']:.3f} s, bound {run['bound_s']:.3f} s, "
            f"efficiency {run['efficiency']:.2f}, speedup {run['speedup']:.2f}, "
            f"sync {run['sync_s']:.4f} s",
            flush=True,
        )
    for row in result.get("staleness", {}).values():
        print(
            f"staleness {row['max_staleness']} pipe {row['pipe']}: step {row['step_s']:.3f} s, "
            f"speedup {row['speedup']:.2f} against s=0, M=1",
            flush=True,
        )
    print(f"report: {result['out_dir']}/report.md", flush=True)


def _device_roles(cfg, placement) -> dict[str, tuple[str, ...]]:
    """Device label -> the roles with a rank on it, for the bench's per-device busy time. CPU
    ranks share the host's cores: one device."""
    from rlhf_pipe.placement import ROLES

    on_cpu = _ranks_on_cpu(placement)
    found: dict[str, list[str]] = {}
    for role in ROLES:
        for rank in placement.ranks_of(role):
            label = "cpu" if on_cpu else "node {} gpu {}".format(*_gpu_of(cfg, rank))
            if role not in found.setdefault(label, []):
                found[label].append(role)
    return {label: tuple(roles) for label, roles in sorted(found.items())}


def _ranks_on_cpu(placement) -> bool:
    """A CPU plan, or a GPU plan ('auto', 'cuda') started where there is no GPU."""
    import torch

    return placement.device == "cpu" or not torch.cuda.is_available()


def _device(cfg, placement):
    """This rank's device: its LOCAL_RANK's GPU (see `_gpu_of`)."""
    import torch

    if _ranks_on_cpu(placement):
        return torch.device("cpu")
    return torch.device("cuda", _gpu_of(cfg, int(os.environ["RANK"]))[1])


def _gpu_of(cfg, rank: int):
    """(node, GPU index) of a rank. placement_config.local_rank_gpus maps local ranks to GPUs;
    by default they share a node's GPUs round-robin (with fewer GPUs than ranks, a smoke-test
    layout: the plan's memory estimate assumes one GPU each)."""
    import torch

    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", "1")))
    local = rank % local_world
    mapping = cfg.placement_config.local_rank_gpus
    if mapping:
        count = torch.cuda.device_count()  # run-time facts: GPU count, LOCAL_WORLD_SIZE
        if len(mapping) != local_world or not all(
            type(g) is int and 0 <= g < max(count, 1) for g in mapping
        ):
            raise UserError(
                f"{cfg.source}: placement_config.local_rank_gpus: expected "
                f"{local_world} GPU indices (one per local rank) below {count}, "
                f"got {mapping!r}"
            )
        return rank // local_world, mapping[local]
    return rank // local_world, local % max(torch.cuda.device_count(), 1)


def _engine_gpus(cfg, placement, leader: int) -> str | None:
    """CUDA_VISIBLE_DEVICES for the engine led by `leader`: its ranks' GPUs. Without it every
    engine's vLLM would take GPU 0 of its node."""
    if _ranks_on_cpu(placement):
        return None
    group = next(g for g in placement.engines if g[0] == leader)
    return ",".join(str(_gpu_of(cfg, r)[1]) for r in group)


def _direct_sync(cfg, placement, role_ranks) -> str | None:
    """The backend of the direct sync from the actor's rank to every vLLM worker: 'nccl', or
    'gloo' (train_config.weight_sync_backend 'gloo_direct'); None: through the controller's
    host memory ('gloo'). NCCL needs the actor on a GPU of its own: two processes of one NCCL
    group cannot share a GPU. 'auto' falls back to the controller otherwise."""
    import torch

    choice = cfg.train_config.weight_sync_backend
    if choice == "gloo" or cfg.plan.lora_sync == "adapter":  # adapter: LoRARequest
        return None
    actor_rank = role_ranks["actor"][0]
    # A ZeRO-3 actor on several ranks gathers its weights with every rank; the sender runs on
    # the first alone (not built), so such a run syncs through the controller.
    sharded = _zero_stages(cfg).get("actor") == 3 and len(role_ranks["actor"]) > 1
    if sharded and choice != "auto":
        raise UserError(
            f"{cfg.source}: train_config.weight_sync_backend: {choice!r} is not "
            f"built for a ZeRO-3 actor on several ranks; use 'gloo' or 'auto'"
        )
    if choice == "gloo_direct":
        # The sender and a receiver in one process would block each other in the broadcast.
        if any(actor_rank in group for group in placement.engines):
            raise UserError(
                f"{cfg.source}: train_config.weight_sync_backend: 'gloo_direct' needs the "
                f"actor (rank {actor_rank}) on a rank that runs no rollout engine"
            )
        return "gloo"
    engine_gpus = {_gpu_of(cfg, r) for group in placement.engines for r in group}
    possible = (
        placement.device != "cpu"
        and torch.cuda.is_available()
        and _gpu_of(cfg, actor_rank) not in engine_gpus
    )
    # Run-time: which GPUs the actor and engines got. Not at load: one process never syncs.
    if choice == "nccl" and not possible:
        raise UserError(
            f"{cfg.source}: train_config.weight_sync_backend: 'nccl' needs the "
            f"actor (rank {actor_rank}) on a GPU that no vLLM engine uses"
        )
    return "nccl" if possible and not sharded else None


def _run_engine(cfg, placement, rank, controller, group) -> None:
    from rlhf_pipe.distributed import guard
    from rlhf_pipe.distributed.remote import GlooTransport, serve
    from rlhf_pipe.trainer import build_vllm_engine

    guard.start()  # the engine core must not outlive this rank
    index = [g[0] for g in placement.engines].index(rank)
    role_ranks = _role_ranks(placement)
    engine = build_vllm_engine(
        cfg,
        index,
        in_process=False,
        weight_receiver=_direct_sync(cfg, placement, role_ranks) is not None,
        visible_devices=_engine_gpus(cfg, placement, rank),
    )
    # Weights come as host buckets, laid out by the controller: no bucket size here.
    serve({Role.ROLLOUT: engine}, GlooTransport(controller, group), bucket_bytes=0)


def _run_roles(cfg, placement, rank, controller, group, dp_groups) -> None:
    from rlhf_pipe.distributed.remote import GlooTransport, serve
    from rlhf_pipe.models import load_tokenizer
    from rlhf_pipe.trainer import build_roles, seed_everything

    seed_everything(cfg.train_config.seed)
    tok_path = cfg.tokenizer_config.tokenizer_path or cfg.model_configs.policy.model_path
    pad_id = load_tokenizer(tok_path, cfg.tokenizer_config.trust_remote_code).pad_token_id
    mine = [r for r in placement.roles_of(rank) if r in MODEL_ROLES]
    serve(
        build_roles(cfg, mine, pad_id, _device(cfg, placement), dp_groups=dp_groups),
        GlooTransport(controller, group),
        cfg.train_config.weight_bucket_mb * 2**20,
    )


def _zero_stages(cfg) -> dict[str, int]:
    """role -> ZeRO stage, for the roles with a deepspeed_config."""
    from rlhf_pipe.zero import zero_stage

    out = {}
    for role in MODEL_ROLES:
        model = getattr(cfg.model_configs, role.config_key)
        if model is not None and model.trainer_config.deepspeed_config:
            out[role] = zero_stage(model.trainer_config.deepspeed_config)
    return out


_CURRENT: dict = {"roles": ()}


def _lost_node(rank: int, message: str) -> str:
    """On several nodes: ', lost node K (rank r role, ...)' for the peer a failure lost
    touch with, so the line on a surviving node names the node that went away. The
    controller's calls name the peer (remote.py: 'rank R (...) unreachable'); the other ranks
    only ever talk to the controller. Ranks are numbered node by node (torchrun)."""
    placement, world = _CURRENT.get("placement"), _CURRENT.get("world", 1)
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world))
    if placement is None or local_world >= world:
        return ""
    found = re.search(r"rank (\d+) \([^)]*\) unreachable", message)
    if found:
        peer = int(found[1])
    elif rank != _CURRENT["controller"] and "unreachable" not in message:
        peer = _CURRENT["controller"]
    else:
        return ""
    node = peer // local_world
    if node == rank // local_world:
        return ""  # a peer of this node: its own line says what happened to it
    return _named(node, range(node * local_world, min((node + 1) * local_world, world)))


def _lost_store() -> str:
    """On SIGTERM (guard.sigterm_grace): ': the rendezvous store ... does not answer; lost
    node K (...)' when the store that another node's agent served is gone: this node's agent,
    which lost it, is what stopped the rank. '' where the store answers or is not known, or
    the rank's own line has named a lost node already."""
    from rlhf_pipe.distributed.guard import answers

    store = _CURRENT.get("store")
    if store is None or int(os.environ["RANK"]) in store.ranks or _CURRENT.get("named"):
        return ""
    if answers(store.host, store.port):
        return ""
    return (
        f": the rendezvous store at {store.host}:{store.port}, served by node {store.node}, "
        f"does not answer{_named(store.node, store.ranks)}"
    )


def _named(node: int, ranks) -> str:
    placement = _CURRENT["placement"]
    named = ", ".join(f"rank {r} {'+'.join(placement.roles_of(r)) or 'no role'}" for r in ranks)
    return f"; lost node {node} ({named})"


def main(argv: list[str] | None = None) -> int:
    args = _parse(sys.argv[1:] if argv is None else argv)
    rank = os.environ.get("RANK", "0")
    try:
        return run(args)
    except user_errors() as e:
        print(f"error: {e}", file=sys.stderr, flush=True)
        return 2
    except Exception as e:
        roles = "+".join(_CURRENT["roles"]) or "no role"
        # The first error, not one that clean-up (closing a dead peer's link) raised after it;
        # an explicit `raise ... from` is a wrapper that already says it all.
        while (
            isinstance(e.__context__, Exception)
            and e.__cause__ is None
            and not e.__suppress_context__
        ):
            e = e.__context__
        first = " ".join(f"{type(e).__name__}: {e}".split())
        lost = _lost_node(int(rank), first)
        _CURRENT["named"] = bool(lost)
        from rlhf_pipe.distributed.guard import say

        sys.stderr.flush()
        say(f"error: rank {rank} ({roles}) failed: {first}{lost}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
