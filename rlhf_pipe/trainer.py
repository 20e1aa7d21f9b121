"""The single-process trainer: builds the roles from a RunConfig and runs PPO steps.

One step reads as named, timed phases:

    relay     = relay_sample_fn(past episodes)        # host, optional: replayed samples
    prompts   = data.next_batch()                    # host, ranked by length if asked
    output    = pipeline.run(plan)                    # generate | forward | advantage | train
    sync      = engine.load_weights(actor weights)    # new policy version into vLLM
    metrics   -> console, JSONL, TensorBoard          # the one host sync of the step

Every stage is a thread here; the distributed runner keeps this control and moves the roles
onto their own ranks. `RLHFTrainer` is the facade and the loop; the pieces are
rlhf_pipe/step_plan.py (what a step runs), step_metrics.py, trainer_state.py (checkpoints,
resume, the work-dir claim) and builders.py (roles, scorers, engines).
"""

from __future__ import annotations

import dataclasses
import math
import time
from pathlib import Path

from rlhf_pipe.builders import (
    build_engine,
    build_eval_source,
    build_prompt_source,
    build_roles,
    build_scorers,
    build_text_prompt_source,
    build_tokenizer,
    build_vllm_engine,
    pick_device,
    resolve_function,
    seed_everything,
)
from rlhf_pipe.checkpoint import CheckpointError, resolve_resume
from rlhf_pipe.config import RunConfig
from rlhf_pipe.data import RelayBuffer
from rlhf_pipe.metrics import MetricsLogger, StageProgress
from rlhf_pipe.pipeline.run_ahead import RunAhead, staleness_metrics
from rlhf_pipe.pipeline.stages import StageError, StepPipeline
from rlhf_pipe.protocols import MODEL_ROLES, WeightSync
from rlhf_pipe.run_dir import RunDir
from rlhf_pipe.step_metrics import step_metrics
from rlhf_pipe.step_plan import (
    StepPlanner,
    StepSizes,
    build_ptx,
    episode_records,
    evaluate,
    sampling_settings,
)
from rlhf_pipe.trainer_state import RunFolder, TrainerState

# Kept importable from here: the README's API and the distributed runner use these names.
__all__ = [
    "RLHFTrainer",
    "build_roles",
    "build_scorers",
    "build_vllm_engine",
    "resolve_function",
    "sampling_settings",
    "seed_everything",
]


def step_sizes(cfg: RunConfig) -> StepSizes:
    """The derived sizes a step plan reads, all in one place (validation computes them)."""
    return StepSizes(
        cfg.prompt_dataset_config.samples_each_epoch,
        cfg.plan.samples_per_step,
        cfg.plan.pipe_micro_bs,
    )


class RLHFTrainer:
    """Build once from a RunConfig, then `learn()`. See docs/architecture.md."""

    def __init__(
        self,
        cfg: RunConfig,
        *,
        reward_fn=None,
        engine=None,
        console: bool = True,
        roles: dict | None = None,
        in_process_engine: bool = True,
        weight_sync: WeightSync | None = None,
    ):
        self.cfg = cfg
        t = cfg.train_config
        seed_everything(t.seed)
        self.device = pick_device(cfg.placement_config.device)
        self.tokenizer = build_tokenizer(cfg)
        self.pad_id = self.tokenizer.pad_token_id
        # Data first: a bad prompt file is reported before any model or engine is built.
        self.batch_generation = cfg.plan.generator.batch_generation
        self.prompts = build_prompt_source(cfg, self.tokenizer)
        self.relay = RelayBuffer(t.max_relay_episode, t.relay_episode_offset)
        self.relay_sample_fn = None
        if t.relay_sample_fn:
            self.relay_sample_fn = resolve_function(
                t.relay_sample_fn, f"{cfg.source}: train_config.relay_sample_fn"
            )
        if roles is None:
            roles = build_roles(cfg, MODEL_ROLES, self.pad_id, self.device, reward_fn)
        elif reward_fn is not None:
            roles["reward"].set_function(reward_fn)
        self.actor, self.critic = roles["actor"], roles.get("critic")
        self.reference, self.reward = roles.get("reference"), roles["reward"]
        self.engine = engine or build_engine(cfg, self.actor, self.tokenizer, in_process_engine)
        self.ptx = build_ptx(
            cfg.pretrain_dataset_config, t.pretrain_loss_weight, self.tokenizer, cfg.constants
        )
        self.eval_prompts = build_eval_source(cfg, self.tokenizer)
        self.pipeline = StepPipeline(
            self.engine,
            self.actor,
            self.critic,
            self.reference,
            self.reward,
            self.tokenizer,
            self.pad_id,
        )
        self.version = 0
        self.step_index = 0
        # None: the actor's named_weights into engine.load_weights; else the direct broadcast
        # from the actor's rank (NCCL or gloo), also for run-ahead's snapshots.
        self.weight_sync = weight_sync
        self.last_sync: dict = {}  # the last weight sync's {seconds, bytes, gbps}
        self.work_dir = Path(t.work_dir)
        self.folder = RunFolder(self.work_dir, t, console)
        self.history: list[dict] = []
        # max_staleness >= 1: the generation thread, started by the first step (run_ahead.py);
        # what a checkpoint had in flight waits here until then.
        self.run_ahead: RunAhead | None = None
        self._run_ahead_state: dict | None = None

    @property
    def planner(self) -> StepPlanner:
        """The step planner over this trainer's data sources (it advances their positions).
        Built on each use, so a changed `cfg` (the bench varies the micro-batch size) or a
        set_prompts / set_relay_sample_fn counts from the next plan on."""
        cfg = self.cfg
        return StepPlanner(
            cfg.train_config,
            cfg.rollout_config,
            cfg.repeater_config,
            step_sizes(cfg),
            prompts=self.prompts,
            ranking=self.batch_generation.ranking,
            relay=self.relay,
            relay_sample_fn=self.relay_sample_fn,
            ptx=self.ptx,
            tokenizer=self.tokenizer,
        )

    @property
    def state(self) -> TrainerState:
        """What state_dict() saves and resume() loads, besides the step and version."""
        return TrainerState(
            self.actor, self.critic, self.prompts, self.ptx, self.relay, self.pipeline.running
        )

    @property
    def logger(self) -> MetricsLogger | None:
        return self.folder.logger  # opened with the work-dir claim

    @property
    def run_dir(self) -> RunDir | None:
        return self.folder.run_dir

    # ------------------------------------------------------------------ Python API

    @classmethod
    def from_config(cls, path: str, overrides: dict | None = None, **kwargs) -> RLHFTrainer:
        """`RLHFTrainer.from_config("cfg.py", {"train_config.max_train_step": 5}).learn()`."""
        from rlhf_pipe.validation import load_config

        return cls(load_config(path, overrides), **kwargs)

    def set_reward_fn(self, fn) -> None:
        """Score with `fn(prompts, responses) -> list[float]` instead of the configured reward
        function (model and remote scorers, if configured, still add their scores)."""
        self.reward.set_function(fn)

    def set_prompts(self, prompts: list[str]) -> None:
        """Train on these prompt texts (rendered with the chat template when there is one)."""
        self.prompts = build_text_prompt_source(
            prompts,
            self.cfg.prompt_dataset_config,
            self.tokenizer,
            self.batch_generation.min_prompt_length,
        )

    def set_relay_sample_fn(self, fn) -> None:
        """Replay past samples with `fn(episode_relay_buffers) -> list[dict]` instead of the
        configured train_config.relay_sample_fn. It is called before each step with the kept
        episodes (`EpisodeRelayBuffer`s, oldest first); see README "Stream data and the relay
        buffer"."""
        if not self.relay.enabled:
            raise ValueError(
                "set_relay_sample_fn: the relay is off "
                "(train_config.max_relay_episode is 0); set it to -1 or >= 1"
            )
        self.relay_sample_fn = fn

    def reward_names(self) -> list[str]:
        """Scorer names in the order of Sample.score_parts (a remote reward role has the
        configured ones)."""
        return list(self.reward.names)

    # ------------------------------------------------------------------ loop

    def train_step(self) -> dict:
        step = self.step_index
        start = time.perf_counter()
        if self.cfg.train_config.max_staleness:
            plan, source = self._take_ahead(step)
        else:
            plan, source = self.planner.plan(step, self.version), None
        # A dynamic step may hold more than PIPE_MICRO_BATCH_NUM micro-batches.
        progress = StageProgress(
            step,
            math.ceil(plan.samples_per_step / plan.pipe_micro_bs),
            self.cfg.train_config.progress_bar,
        )
        self.pipeline.on_event = progress
        try:
            out = self.pipeline.run(plan) if source is None else self.pipeline.run(plan, source)
        except StageError:
            if self.run_ahead is not None:  # the cause, not "the generation thread stopped"
                self.run_ahead.raise_if_failed()
            raise
        finally:
            progress.close()
        sync_start = time.perf_counter()
        skipped = "nonfinite_skipped" in out.train_metrics
        trained_at = self.version
        updated = plan.update_actor and not skipped
        if updated:
            self.version += 1
        if self.run_ahead is not None:  # the generation thread loads them between two steps
            snapshot = self._snapshot() if updated else None
            self.run_ahead.publish(step, self.version, snapshot, _train_span(out))
        elif updated:
            self._sync_weights()
        sync_s = time.perf_counter() - sync_start
        if self.relay.enabled:
            self.relay.add(step, episode_records(step, out.samples))
        metrics = step_metrics(
            out,
            plan,
            version=self.version,
            reward_names=self.reward_names(),
            step_s=time.perf_counter() - start,
            sync_s=sync_s,
            last_sync=self.last_sync if self.run_ahead is None else self.run_ahead.last_sync,
            call_seconds=self._call_seconds(),
            skipped_prompts=sum(self.prompts.skipped.values()),
        )
        metrics.update(
            staleness_metrics(out.samples, trained_at, self.cfg.train_config.max_staleness)
        )
        self.step_index += 1
        return metrics

    # ------------------------------------------------------------------ run-ahead

    def _take_ahead(self, step: int):
        """max_staleness >= 1: step `step`'s plan, with this step's replayed samples, and the
        channel its completions arrive on from the generation thread (started here once)."""
        t = self.cfg.train_config
        if self.run_ahead is None:
            self.run_ahead = RunAhead(
                self.engine,
                t.max_staleness,
                lambda j: self.planner.plan(j, self.version, relay_now=False),
                step,
                t.stage_timeout_s + self.cfg.rollout_config.request_timeout_s,
                self._run_ahead_state,
                self._load_snapshot,
            )
            self._run_ahead_state = None
        plan, channel = self.run_ahead.take(step)
        planner = self.planner
        relay = planner.relay_items()
        n = len(plan.prompt_ids) * self.cfg.rollout_config.n
        replayed, texts = planner.relay_completions(relay, len(plan.prompt_ids), n)
        plan = dataclasses.replace(
            plan,
            relay=replayed,
            prompt_texts=plan.prompt_texts + texts,
            samples_per_step=plan.samples_per_step + len(replayed),
            on_policy_version=None,  # the staleness bound stands for it
        )
        return plan, channel

    def _snapshot(self):
        """The weights of `self.version`, kept until the generation thread loads them: a copy
        of the actor's named_weights here (they train on), or with the direct sync a copy on
        the actor's own device, named by the version."""
        if self.weight_sync is None:
            return [(n, t.detach().clone()) for n, t in self.actor.named_weights()]
        self.weight_sync.snapshot(self.version)
        return self.version

    def _load_snapshot(self, snapshot, version: int) -> dict:
        """On the generation thread, between two generates: `_snapshot()`'s weights into
        every engine."""
        if self.weight_sync is None:
            return self.engine.load_weights(iter(snapshot), version)
        return self.weight_sync.send_snapshot(snapshot)

    def _call_seconds(self) -> dict:
        """Roles on other ranks: their calls since the last step's metrics (the weight sync's
        among them), seconds seen from here and, of those, inside the method."""
        out = {}
        for name, role in zip(MODEL_ROLES, (self.actor, self.critic, self.reference, self.reward)):
            seconds = role.take_call_seconds() if role is not None else None
            if seconds is not None:
                out[name] = seconds
        return out

    def evaluate(self) -> dict:
        """Generate on the eval prompts with the eval sampling settings and score them."""
        if self.run_ahead is not None:  # the engine idle, holding the current weights
            self.run_ahead.quiesce()
        return evaluate(
            self.engine, self.reward, self.tokenizer, self.eval_prompts, self.cfg.rollout_config
        )

    def learn(self, max_steps: int | None = None) -> list[dict]:
        t = self.cfg.train_config
        total = max_steps if max_steps is not None else t.max_train_step
        self.folder.claim()
        try:
            while self.step_index < total:
                metrics = self.train_step()
                step = self.step_index
                logged = {k: v for k, v in metrics.items() if k != "timeline"}
                if t.eval_interval and step % t.eval_interval == 0:
                    metrics.update(self.evaluate())
                    logged.update({k: v for k, v in metrics.items() if k.startswith("eval/")})
                self.history.append(metrics)
                if step % t.log_interval == 0 or step == total:
                    self.logger.log(step, logged)
                if t.save_interval and step % t.save_interval == 0 and step != total:
                    self.save(step)
            self.save(self.step_index)
        finally:
            self.logger.close()
        return self.history

    # ------------------------------------------------------------------ state

    def save(self, step: int) -> Path:
        return self.folder.save(step, self.actor, self.critic, self.tokenizer, self.state_dict())

    def state_dict(self) -> dict:
        """Everything besides model weights that the next step depends on."""
        if self.run_ahead is not None:  # in-flight steps complete, the data position after them
            self.run_ahead.quiesce()
        state = self.state.state_dict(self.step_index, self.version)
        if self.run_ahead is not None:
            state["run_ahead"] = self.run_ahead.state_dict()
        elif self._run_ahead_state is not None:
            state["run_ahead"] = self._run_ahead_state
        return state

    def resume(self, checkpoint: str | Path) -> Path | None:
        """Continue a run: 'auto' takes the newest complete checkpoint in work_dir (none there:
        the run starts again at step 0), a path that checkpoint. Call it before learn(); the
        next step continues exactly, and metrics.jsonl keeps one line per step. Returns the
        checkpoint loaded, or None."""
        if self.folder.run_dir is not None:
            raise CheckpointError("resume: call it before learn() or save()")
        path = resolve_resume(str(checkpoint), self.work_dir)
        if path is None:
            self.folder.resumed = (0, None)
            return None
        state = self.state.load(path)
        self.step_index, self.version = state["step"], state["version"]
        ahead = state.get("run_ahead")
        s = self.cfg.train_config.max_staleness
        if ahead is not None and ahead["max_staleness"] != s:
            raise CheckpointError(
                f"{path}: written with train_config.max_staleness={ahead['max_staleness']}, "
                f"this run has {s}: its in-flight samples follow the other schedule"
            )
        self._run_ahead_state = ahead
        # At s >= 1 too: a checkpoint is written quiesced, every published snapshot applied,
        # so the engine held the actor's saved weights; they are loaded the same way here
        # (live, over either sync) before the generation thread starts. Snapshots are never
        # saved: none was pending.
        self._sync_weights()
        self.folder.resumed = (self.step_index, path)
        return path

    def _sync_weights(self) -> None:
        """The actor's current weights into every engine, stamped with `self.version`."""
        if self.weight_sync is not None:
            self.last_sync = self.weight_sync(self.version)
        else:
            self.last_sync = self.engine.load_weights(self.actor.named_weights(), self.version)

    def close(self) -> None:
        if self.run_ahead is not None:
            self.run_ahead.close()
        self.pipeline.close()
        self.folder.close()


def _train_span(out) -> tuple[float, float]:
    """(start, end) of a step's Train stage in perf_counter seconds: its first training call to
    the end of its optimizer step (recorded in every step)."""
    train = ("train", "actor.train", "critic.train", "optimizer")
    spans = [(a, b) for stage, _, a, b in out.timeline if stage in train]
    return out.t0 + min(a for a, _ in spans), out.t0 + max(b for _, b in spans)
