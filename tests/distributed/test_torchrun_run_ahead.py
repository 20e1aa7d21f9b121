"""Run-ahead (max_staleness=1) under torchrun, gloo, in the layouts that change who runs
what: one rank per role, every role in one process (colocate_all: torchrun with one rank),
actor, critic and reference colocated in one process, the hf generator (the rollout on the
actor's rank, in the controller's process), and two vLLM engines; and the two syncs: each
step's weights through the controller ('gloo': the colocated layouts), or broadcast from the
actor's rank to the vLLM workers out of a snapshot on the actor's device ('gloo_direct', the
CPU twin of 'nccl': one rank per role, two engines). Each ends with the weights of the
one-process run with the same staleness and generator."""

import json

import pytest

from rlhf_pipe.trainer import RLHFTrainer
from tests.conftest import tiny_config
from tests.distributed.test_torchrun import _single_process, _torchrun, _weights

pytestmark = pytest.mark.slow
STEPS = 3  # step 2 is the first one generated from published (step 0's) weights
HF = "model_configs.policy.generator_config.generator_type=hf"
DIRECT = "train_config.weight_sync_backend=gloo_direct"


@pytest.fixture(scope="module")
def singles(tmp_path_factory, vllm_engine, initial_policy_weights):
    """generator -> the final checkpoint of the one-process run at max_staleness=1, made once
    for every layout that uses that generator."""
    made = {}

    def get(generator: str):
        if generator not in made:
            path = tmp_path_factory.mktemp(f"single_{generator}")
            over = {"train_config.max_staleness": 1}
            if generator == "vllm":
                made[generator] = _single_process(
                    path, vllm_engine, initial_policy_weights, STEPS, **over
                )
            else:  # the trainer builds its own hf engine
                over["model_configs.policy.generator_config.generator_type"] = generator
                trainer = RLHFTrainer(tiny_config(path, **over), console=False)
                trainer.learn(STEPS)
                trainer.close()
                made[generator] = path / "run" / "checkpoints" / f"step_{STEPS:06d}"
        return made[generator]

    return get


@pytest.mark.parametrize(
    "layout,nproc,extra",
    [
        # The sync through the controller is the next case's (its roles share one rank).
        ("one rank per role, gloo_direct", 4, (DIRECT,)),
        ("every role in one process", 1, ("placement_config.colocate_all=True",)),
        (
            "actor, critic and reference in one process",
            2,
            (
                "placement_config.colocate_actor_ref=True",
                "placement_config.colocate_actor_critic=True",
            ),
        ),
        # Rank 0 holds the rollout (a copy of its actor's module) and the actor.
        ("hf generator with the actor", 3, (HF,)),
        # Engine 0 in the controller, engine 1 on its own rank; the generation thread drives
        # both (EnginePool) and has the actor's rank broadcast each step's weights to both
        # (the pool's load_weights through the controller is test_torchrun.py's at s=0).
        (
            "two vLLM engines, gloo_direct",
            5,
            ("model_configs.policy.generator_config.num_engines=2", DIRECT),
        ),
    ],
)
def test_torchrun_run_ahead_equals_single_process(tmp_path, singles, layout, nproc, extra):
    # A longer stage timeout than _torchrun's 60 s: on 2 shared cores, 5 ranks starting two
    # vLLM engines have kept a peer waiting past 60 s.
    sets = ("train_config.max_staleness=1", "train_config.stage_timeout_s=180", *extra)
    proc = _torchrun(nproc, tmp_path / "dist", STEPS, sets)
    assert proc.returncode == 0, proc.stderr[-5000:]
    if nproc > 1:
        assert f"trained to step {STEPS}" in proc.stdout
    lines = [json.loads(x) for x in (tmp_path / "dist" / "metrics.jsonl").read_text().splitlines()]
    assert [x["step"] for x in lines] == list(range(1, STEPS + 1))
    # Every engine had the published weights in time: steps >= 1 are trained one version on.
    n = lines[0]["samples"]
    assert [x.get("staleness/1", 0) for x in lines] == [0] + [n] * (STEPS - 1), layout
    assert all(x["staleness/violations"] == 0 for x in lines)
    if DIRECT in extra:
        assert "rlhf_pipe weight sync: gloo_direct" in proc.stderr
        # Step 2 was generated after the thread had the actor's rank broadcast W(0) to every
        # engine: its metrics carry that broadcast's report (run_ahead.last_sync).
        assert lines[2]["sync/bytes"] > 0 and lines[2]["sync/gbps"] > 0, lines[2]
    dist_ckpt = tmp_path / "dist" / "checkpoints" / f"step_{STEPS:06d}"
    single = singles("hf" if HF in extra else "vllm")
    for part in ("actor", "critic"):
        a, b = _weights(dist_ckpt / part), _weights(single / part)
        assert a.keys() == b.keys()
        diff = max((a[k] - b[k]).abs().max().item() for k in a)
        print(f"run-ahead, {layout}: {part} max |difference| = {diff}")
        # Two engines: per-request seeds give the same tokens, but the completion order
        # across engines (micro-batch membership, the float order of gradient sums) may differ
        # from one engine's; the bound is test_torchrun.py's for the same reason.
        assert diff <= (2e-4 if "engines" in layout else 0.0), f"{layout}: {part} {diff}"
