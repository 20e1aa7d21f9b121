"""The roles on their own torchrun ranks (gloo, CPU): same weights as one process, and a
killed rank takes the whole run down quickly with a message naming it."""

import ast
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from rlhf_pipe.trainer import RLHFTrainer
from tests.conftest import ROOT, TINY_CONFIG, tiny_config

pytestmark = pytest.mark.slow
QUIET = {
    "train_config.progress_bar": False,
    "train_config.tensorboard": False,
    "train_config.stage_timeout_s": 60,
}


def _torchrun(nproc, work, steps, extra=(), wait=True, args=()):
    sets = {**QUIET, "train_config.work_dir": str(work), "train_config.max_train_step": steps}
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(nproc),
        "--master-port",
        str(29500 + os.getpid() % 1000),
        "-m",
        "rlhf_pipe.train",
        str(TINY_CONFIG),
    ]
    for k, v in sets.items():
        cmd += ["--set", f"{k}={v}"]
    for item in extra:
        cmd += ["--set", item]
    cmd += list(args)
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)
    if not wait:
        return subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def _weights(folder: Path) -> dict:
    out = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def _single_process(tmp_path, engine, initial, steps, **over):
    engine.load_weights(initial.items(), version=0)
    trainer = RLHFTrainer(tiny_config(tmp_path, **over), engine=engine, console=False)
    trainer.learn(steps)
    trainer.close()
    return tmp_path / "run" / "checkpoints" / f"step_{steps:06d}"


# The equality cases' stage timeout: _torchrun's 60 s bounds the kill tests' detection, but on
# 2 shared cores 5 ranks starting vLLM have kept a peer waiting past 60 s.
SLACK = "train_config.stage_timeout_s=180"


def _ok(proc) -> None:
    assert proc.returncode == 0, "\n".join(
        line for line in proc.stderr.splitlines() if "error" in line.lower()
    )[-3000:]


@pytest.fixture(scope="module")
def singles(tmp_path_factory, vllm_engine, initial_policy_weights):
    """(steps, config overrides) -> the final checkpoint of that one-process run, trained once
    for every test of this module that compares with it."""
    made = {}

    def get(steps: int, over: dict):
        key = (steps, repr(sorted(over.items())))
        if key not in made:
            path = tmp_path_factory.mktemp("single")
            made[key] = _single_process(path, vllm_engine, initial_policy_weights, steps, **over)
        return made[key]

    return get


ZERO2 = "{'zero_optimization': {'stage': 2}}"
ZERO2_TWO_RANKS = (
    "model_configs.policy.trainer_config.parallel.data.size=2",
    "PIPE_MICRO_BATCH_NUM=2",
    "train_config.num_mini_batches=4",
    f"model_configs.policy.trainer_config.deepspeed_config={ZERO2}",
    f"model_configs.critic.trainer_config.deepspeed_config={ZERO2}",
)


@pytest.fixture(scope="module")
def zero2_two_ranks(tmp_path_factory):
    """One launch for two tests (a 5-rank DeepSpeed start is among the suite's slowest): actor
    and critic under ZeRO-2, the actor on 2 data-parallel ranks, 2 steps. Returns the process
    and its work dir."""
    work = tmp_path_factory.mktemp("zero2_two_ranks") / "dist"
    return _torchrun(5, work, 2, (*ZERO2_TWO_RANKS, SLACK)), work


@pytest.mark.parametrize(
    "layout,nproc,extra",
    [
        # One rank per role with 'gloo_direct' (the actor's rank broadcasting to the vLLM
        # worker) is the kill-and-resume chain's layout below.
        # Both two-role colocations in one launch (they share no rank): the reference on the
        # actor's rank, a learned reward model on the critic's (REWARD: the tiny reward
        # model's folder); the actor's weights go through the controller. The controller
        # sync from an actor on a rank of its own: the two-engine and data-parallel cases,
        # and exactly test_zero2_checkpoint_of_two_ranks_resumes_on_one and test_multinode.py.
        (
            "actor with reference, critic with reward model",
            3,
            (
                "placement_config.colocate_actor_ref=True",
                "placement_config.colocate_critic_reward=True",
                "model_configs.reward.model_path=REWARD",
            ),
        ),
        # Actor, critic and reference in one process: their calls take turns on that rank.
        (
            "actor, critic and reference in one process",
            2,
            (
                "placement_config.colocate_actor_ref=True",
                "placement_config.colocate_actor_critic=True",
            ),
        ),
        # Two vLLM engines (the pool's weights through the controller) and the actor on 2
        # data-parallel ranks, in one launch: rollout, engine 1, actor x 2, critic, reference.
        (
            "two vLLM engines, actor on two data-parallel ranks",
            6,
            (
                "model_configs.policy.generator_config.num_engines=2",
                "model_configs.policy.trainer_config.parallel.data.size=2",
                "PIPE_MICRO_BATCH_NUM=2",
            ),
        ),
        # DeepSpeed: actor and critic each under ZeRO, the actor on 2 data-parallel ranks. With
        # 4 mini-batches of one train chunk each, rank 1 gets no chunk: it joins ZeRO's
        # collectives with zero-weight passes.
        ("ZeRO-2, actor on two data-parallel ranks", 5, ZERO2_TWO_RANKS),
        (
            "ZeRO-3, actor on two data-parallel ranks",
            5,
            tuple(e.replace("'stage': 2", "'stage': 3") for e in ZERO2_TWO_RANKS),
        ),
    ],
)
def test_torchrun_equals_single_process(
    tmp_path, request, singles, initial_policy_weights, tiny_assets, layout, nproc, extra
):
    extra = tuple(e.replace("=REWARD", f"={tiny_assets.reward}") for e in extra)
    if layout.startswith("ZeRO-2"):  # the launch test_zero2_checkpoint_... resumes from
        proc, work = request.getfixturevalue("zero2_two_ranks")
    else:
        proc, work = _torchrun(nproc, tmp_path / "dist", 2, (*extra, SLACK)), tmp_path / "dist"
    _ok(proc)
    assert "trained to step 2" in proc.stdout
    dist_ckpt = work / "checkpoints" / "step_000002"
    # The one-process run has the same batch split and the same ZeRO stage (ZeRO against
    # plain AdamW is measured in tests/pipeline/test_zero.py).
    same = {
        k: (v if k.endswith("model_path") else ast.literal_eval(v))
        for k, v in (item.split("=", 1) for item in extra)
        if k
        in (
            "PIPE_MICRO_BATCH_NUM",
            "train_config.num_mini_batches",
            "model_configs.reward.model_path",
        )
        or k.endswith("deepspeed_config")
    }
    single = singles(2, same)
    for part in ("actor", "critic"):
        a, b = _weights(dist_ckpt / part), _weights(single / part)
        assert a.keys() == b.keys()
        diff = max((a[k] - b[k]).abs().max().item() for k in a)
        print(f"{layout}: {part} max |difference| = {diff}")
        # Per-request seeds make every engine sample the same tokens. With two engines the
        # completion order across engines (hence micro-batch membership and the float order
        # of gradient sums) may differ from one engine's, so equality is exact only when
        # the order happens to match; the bound below is what a reordering can cost.
        # Data-parallel ranks sum their gradients in another order than one rank does.
        limit = 2e-4 if ("engines" in layout or "data-parallel" in layout) else 0.0
        assert diff <= limit, f"{layout}: {part} differs by {diff}"
    assert _weights(dist_ckpt / "actor").keys()  # not an empty folder
    assert any(
        not torch.equal(_weights(dist_ckpt / "actor")[k], initial_policy_weights[k])
        for k in initial_policy_weights
    )


def _processes():
    """pid -> (parent pid, environment) of every process we may read."""
    parent, env_of = {}, {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            env = (entry / "environ").read_bytes().split(b"\0")
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        pid = int(entry.name)
        parent[pid] = int(stat.rsplit(")", 1)[1].split()[1])
        env_of[pid] = dict(v.split(b"=", 1) for v in env if b"=" in v)
    return parent, env_of


def _rank_pids(root_pid: int) -> dict[int, int]:
    """RANK -> pid of the torchrun workers started below root_pid (other runs on the machine
    are not counted)."""
    parent, env_of = _processes()

    def below_root(pid):
        while pid in parent and pid > 1:
            pid = parent[pid]
            if pid == root_pid:
                return True
        return False

    out = {}
    for pid, vars_ in env_of.items():
        if b"TORCHELASTIC_RUN_ID" not in vars_ or b"RANK" not in vars_ or not below_root(pid):
            continue
        rank = int(vars_[b"RANK"])
        if rank not in out or pid < out[rank]:  # the rank's top process (not its children)
            out[rank] = pid
    return out


def _run_survivors(master_port: bytes) -> list[int]:
    """Processes of one torchrun run still alive, wherever they were reparented to (a run is
    told apart by its MASTER_PORT, which its workers and their children inherit)."""
    _, env_of = _processes()
    return [
        pid
        for pid, vars_ in env_of.items()
        if b"TORCHELASTIC_RUN_ID" in vars_ and vars_.get(b"MASTER_PORT") == master_port
    ]


def _kill_rank(proc, victim: int, ready) -> str:
    """Once `ready()` (the run is in its steps), SIGKILL rank `victim` of the 4-rank run
    `proc`: every rank stops within 60 s, no process of the run outlives it, and torchrun
    names the dead rank and how it died; the placement line gives its role. Its stderr."""
    try:
        deadline = time.monotonic() + 300
        while not ready():
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            assert time.monotonic() < deadline
            time.sleep(0.2)
        pids = _rank_pids(proc.pid)
        assert sorted(pids) == [0, 1, 2, 3], pids
        port = _processes()[1][pids[0]][b"MASTER_PORT"]
        os.kill(pids[victim], signal.SIGKILL)
        killed_at = time.monotonic()
        _, stderr = proc.communicate(timeout=90)
        elapsed = time.monotonic() - killed_at
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode != 0
    assert elapsed < 60, (victim, elapsed)
    time.sleep(1)
    assert not _run_survivors(port), f"a process of the run outlived it (rank {victim} killed)"
    assert f"exitcode: -9) local_rank: {victim}" in stderr, stderr[-3000:]
    assert (
        "rlhf_pipe placement: rank 0 rollout, rank 1 actor, rank 2 critic, rank 3 reference"
        in stderr
    )
    return stderr


def test_killed_ranks_stop_every_rank_and_resume_auto_continues_exactly(
    tmp_path, vllm_engine, initial_policy_weights
):
    """kill -9 of the critic's rank mid-run, `--resume auto`, kill -9 of the controller's rank
    mid-run, `--resume auto` again through `rlhf-pipe train --nproc auto`: each kill stops
    every rank within 60 s (_kill_rank), each resume goes on from the last whole checkpoint,
    and the run ends with the weights of an uninterrupted one-process run, exactly. One rank
    per role, the actor's rank broadcasting each step's weights to the vLLM worker over a gloo
    group of their own ('gloo_direct', as 'nccl' does on GPUs): the same bytes as through the
    controller (that sync's exact runs of this layout: test_zero2_checkpoint_... below and
    test_multinode.py), so the same run. (Three launches where a launch for each kill, one
    to resume, one for the launcher and one for this layout took six.)"""
    work = tmp_path / "dist"
    save = ("train_config.save_interval=1", "train_config.weight_sync_backend=gloo_direct")
    direct = "rlhf_pipe weight sync: gloo_direct"

    def whole() -> list[int]:
        """The steps of the whole checkpoints (not the step_N.tmp folders being written)."""
        folders = (work / "checkpoints").glob("step_*")
        steps = (p.name[5:] for p in folders if (p / "COMPLETE").exists())
        return sorted(int(n) for n in steps if n.isdigit())

    # The critic's rank, once the first checkpoint is whole.
    assert direct in _kill_rank(_torchrun(4, work, 200, save, wait=False), 2, lambda: bool(whole()))
    first = whole()[-1]
    # The controller's rank, once the resumed run has a whole checkpoint of its own.
    resumed = _torchrun(4, work, 200, save, wait=False, args=("--resume", "auto"))
    assert direct in _kill_rank(resumed, 0, lambda: whole()[-1] > first)
    last = whole()[-1]
    total = last + 2
    # `rlhf-pipe train --nproc auto` launches torchrun with the placement's 4 ranks and
    # forwards --max-steps, --work-dir, --resume and --set.
    cmd = [sys.executable, "-m", "rlhf_pipe", "train", str(TINY_CONFIG), "--nproc", "auto"]
    cmd += ["--max-steps", str(total), "--work-dir", str(work), "--resume", "auto"]
    for item in (*(f"{k}={v}" for k, v in QUIET.items()), *save):
        cmd += ["--set", item]
    env = {k: v for k, v in os.environ.items() if k != "VLLM_ENABLE_V1_MULTIPROCESSING"}
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "--nproc-per-node 4 -m rlhf_pipe.train" in proc.stdout
    assert f"trained to step {total}" in proc.stdout
    assert direct in proc.stderr
    assert (work / "checkpoints" / f"step_{total:06d}" / "COMPLETE").exists()
    steps = [json.loads(line)["step"] for line in (work / "metrics.jsonl").read_text().splitlines()]
    assert steps[-2:] == [last + 1, last + 2]  # the last run logged only the new steps
    single = _single_process(tmp_path / "single", vllm_engine, initial_policy_weights, total)
    for part in ("actor", "critic"):
        a = _weights(work / "checkpoints" / f"step_{total:06d}" / part)
        b = _weights(single / part)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part


def test_zero2_checkpoint_of_two_ranks_resumes_on_one(
    tmp_path, zero2_two_ranks, vllm_engine, initial_policy_weights
):
    """A ZeRO-2 actor on 2 data-parallel ranks saves (the ZeRO-2 layout's launch above); a
    run with the actor on 1 rank (and a plain AdamW critic) resumes it for a third step, as
    one process resuming it does."""
    proc, work = zero2_two_ranks
    _ok(proc)
    ckpt = work / "checkpoints" / "step_000002"
    saved = torch.load(ckpt / "trainer_state.pt", weights_only=False)
    assert saved["actor"]["layout"] == "ZeRO-2 over 2 rank(s)"  # gathered from both ranks

    one = (
        "PIPE_MICRO_BATCH_NUM=2",
        "train_config.num_mini_batches=4",
        f"model_configs.policy.trainer_config.deepspeed_config={ZERO2}",
    )
    proc = _torchrun(4, tmp_path / "dp1", 3, (*one, SLACK), args=("--resume", str(ckpt)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "trained to step 3" in proc.stdout
    dist_ckpt = tmp_path / "dp1" / "checkpoints" / "step_000003"

    # The same resume in one process: its restored moments are the saved ones, exactly.
    from deepspeed.utils import safe_get_full_optimizer_state

    vllm_engine.load_weights(initial_policy_weights.items(), version=0)
    single = RLHFTrainer(
        tiny_config(
            tmp_path / "single",
            PIPE_MICRO_BATCH_NUM=2,
            **{
                "train_config.num_mini_batches": 4,
                "model_configs.policy.trainer_config.deepspeed_config": ast.literal_eval(ZERO2),
            },
        ),
        engine=vllm_engine,
        console=False,
    )
    single.resume(ckpt)
    params = dict(single.actor.model.named_parameters())
    for name, entry in saved["actor"]["params"].items():
        assert torch.equal(
            safe_get_full_optimizer_state(params[name], "exp_avg"), entry["exp_avg"]
        ), name
    single.learn(3)
    single.close()
    # After step 3 the torchrun run holds the same weights and Adam moments, bit for bit (as
    # the one-rank-per-role layouts above): its ranks restored the same state.
    state = torch.load(dist_ckpt / "trainer_state.pt", weights_only=False)
    for part, role in (("actor", single.actor), ("critic", single.critic)):
        a = _weights(dist_ckpt / part)
        b = _weights(tmp_path / "single" / "run" / "checkpoints" / "step_000003" / part)
        diff = max((a[k] - b[k]).abs().max().item() for k in a)
        moments = state[part]["params"]
        mine = role.training_state()["params"]
        mdiff = max(
            (moments[n]["exp_avg"] - mine[n]["exp_avg"]).abs().max().item() for n in moments
        )
        print(
            f"dp 2 -> dp 1 resume, torchrun vs one process: {part} weights {diff:.3g}, "
            f"exp_avg {mdiff:.3g}"
        )
        assert diff == 0.0 and mdiff == 0.0, (part, diff, mdiff)
