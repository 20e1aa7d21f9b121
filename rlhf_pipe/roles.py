"""The four model roles as objects the stages call: forward on samples, train on samples.

This is the seam between the pipeline's control and where a model lives. Here every role is a
model in this process; the distributed runner puts the same methods behind rank groups. A role
takes and returns per-sample tensors (unpadded), so the caller never sees padding.

Metrics come back as detached tensors (sums and counts); the trainer moves them to the host once
per step.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from rlhf_pipe import lora, optim_state
from rlhf_pipe.checkpoint import CheckpointError
from rlhf_pipe.models import (
    VARLEN_ATTENTION,
    attention_implementation,
    packing_supported,
    response_logprobs,
    save_hf,
    sequence_scores,
    token_values,
)
from rlhf_pipe.pipeline.batch import Sample, chunks, collate, pad_field
from rlhf_pipe.ppo import core


@dataclass(frozen=True)
class LossSettings:
    policy_clip: float
    value_clip: float | None
    ppo_loss_weight: float
    value_loss_weight: float
    loss_agg: str  # "token_mean" | "seq_mean_token_mean"
    kl_loss_coeff: float = 0.0  # > 0: KL to the reference as a loss term (k3 estimator)
    dual_clip_c: float | None = None  # > 1: dual-clip bound for negative advantages
    # None | 'tis' | 'decoupled': weight the policy loss by pi_old / pi_behaviour
    # (core.behaviour_weights), capped at behaviour_is_cap
    behaviour_correction: str | None = None
    behaviour_is_cap: float = 3.0


def grad_divisor(loss_agg: str, num_tokens: int) -> float:
    """token_mean sums per-token losses while the batch streams in; its normaliser (the batch's
    response-token count) is only known at the end, so the summed gradient is divided once
    before clipping and the step. seq_mean_token_mean normalises by the sample count, known
    up front, inside the loss."""
    return float(num_tokens) if loss_agg == "token_mean" else 1.0


def _loss(per_token: Tensor, mask: Tensor, loss_agg: str, num_samples: int) -> Tensor:
    if loss_agg == "token_mean":
        return core.aggregate(per_token, mask, 1.0)
    return core.seq_mean_token_mean(per_token, mask, num_samples)


def _make_optimizer(
    model: nn.Module, lr: float, betas, eps: float, weight_decay: float, warmup_steps: int
):
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(
        params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay, foreach=True
    )
    return opt, warmup_schedule(opt, warmup_steps)


def warmup_schedule(opt, warmup_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda step: min(1.0, (step + 1) / warmup_steps) if warmup_steps else 1.0
    )


class _InProcess:
    def take_call_seconds(self) -> None:
        """None: the role runs in this process, there are no calls to time
        (rlhf_pipe.protocols.RoleBase)."""
        return None


class _Trainable(_InProcess):
    """`packed`: chunks go to the model as PackedBatch (see choose_packing). `dp_group`: the
    process group of the role's data-parallel ranks (None: one rank), for the gradient
    all-reduce."""

    model: nn.Module

    def __init__(
        self,
        model,
        pad_id: int,
        *,
        lr,
        betas,
        eps,
        weight_decay,
        warmup_steps,
        max_grad_norm,
        infer_micro_bs: int,
        train_micro_bs: int,
        packed: bool = False,
        dp_group=None,
        logit_chunk_tokens: int = 0,
    ):
        self.pad_id, self.infer_micro_bs, self.train_micro_bs = (
            pad_id,
            infer_micro_bs,
            train_micro_bs,
        )
        # Log-probs from hidden states this many tokens at a time (models.response_logprobs).
        self.logit_chunk_tokens = logit_chunk_tokens
        self.packed, self.dp_group = packed, dp_group
        self.model = model
        if not lora.has_lora(model):  # a LoRA model keeps its base frozen
            self.model.requires_grad_(True)
        self.optimizer, self.scheduler = _make_optimizer(
            model, lr, betas, eps, weight_decay, warmup_steps
        )
        self.max_grad_norm = max_grad_norm
        self.device = next(model.parameters()).device

    def _backward(self, loss: Tensor) -> None:
        loss.backward()  # rlhf_pipe.zero routes it through the DeepSpeed engine

    def prepare_step(self, grad_divisor: float):
        """Divide the accumulated grads by the batch normaliser and clip them. Returns the
        pre-clip norm (a tensor), or None when there is nothing to update."""
        if self.dp_group is not None:
            self._all_reduce_grads()
        params = [p for p in self.model.parameters() if p.grad is not None]
        if not params:
            return None
        if grad_divisor != 1.0:
            torch._foreach_div_([p.grad for p in params], grad_divisor)
        return torch.nn.utils.clip_grad_norm_(
            params, self.max_grad_norm if self.max_grad_norm else math.inf
        )

    def _all_reduce_grads(self) -> None:
        """Sum the data-parallel ranks' gradients in one flat buffer (a rank that trained no
        chunk contributes zeros, so every rank joins the same collective)."""
        import torch.distributed as dist
        from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

        params = [p for p in self.model.parameters() if p.requires_grad]
        for p in params:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        grads = [p.grad for p in params]
        flat = _flatten_dense_tensors(grads)
        dist.all_reduce(flat, group=self.dp_group)
        for g, reduced in zip(grads, _unflatten_dense_tensors(flat, grads)):
            g.copy_(reduced)

    def apply_step(self, norm) -> dict:
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"grad_norm": norm.detach(), "lr": self.scheduler.get_last_lr()[0]}

    def drop_grads(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def divide_grads(self, divisor: float) -> None:
        grads = [p.grad for p in self.model.parameters() if p.grad is not None]
        if grads and divisor != 1.0:
            torch._foreach_div_(grads, divisor)

    def save(self, out_dir: str) -> None:
        if lora.has_lora(self.model):  # merged plain HF folder + the adapter that resume loads
            save_hf(self.model, out_dir, state_dict=lora.merged_tensors(self.model))
            lora.save_adapter(self.model, Path(out_dir) / lora.ADAPTER_DIR)
            return
        save_hf(self.model, out_dir)

    def training_state(self) -> dict:
        # By parameter name: loads into plain or ZeRO roles of any data-parallel size.
        return optim_state.plain_state(self.model, self.optimizer, self.scheduler)

    def load_training_state(self, state: dict) -> None:
        if optim_state.is_universal(state):
            optim_state.load_plain(self.model, self.optimizer, self.scheduler, state)
            return
        if "optimizer" not in state:  # the per-rank format ZeRO roles wrote before
            raise CheckpointError(
                "the checkpoint's optimizer state is DeepSpeed ZeRO's per-rank "
                "format, this run has no deepspeed_config: resume with the "
                "same one"
            )
        self.optimizer.load_state_dict(state["optimizer"])  # the format written before
        self.scheduler.load_state_dict(state["scheduler"])

    def load_weights_from(self, folder: str) -> None:
        """Weights of an HF folder written by `save`, strictly (rotary buffers aside)."""
        from safetensors.torch import load_file

        if lora.has_lora(self.model):  # the base is model_path's, frozen: load the adapter
            lora.load_adapter(self.model, Path(folder) / lora.ADAPTER_DIR)
            return
        weights = {}
        for f in sorted(Path(folder).glob("*.safetensors")):
            weights.update(load_file(str(f)))
        missing, unexpected = self.model.load_state_dict(weights, strict=False)
        if unexpected or [k for k in missing if "rotary" not in k]:
            raise CheckpointError(
                f"{folder}: weights do not match the model "
                f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
            )


class PolicyRole(_Trainable):
    """The actor: log-probs for the Forward stage, PPO (and PTX) updates for the Train stage.
    `lora_sync`: with LoRA, what named_weights sends, 'merged' or 'adapter'."""

    def __init__(self, model, pad_id: int, *, lora_sync: str = "merged", **kw):
        super().__init__(model, pad_id, **kw)
        self.lora_sync = lora_sync
        # Run-ahead over the direct sync: version -> a copy of those weights on this device,
        # kept until broadcast (at most max_staleness + 1; rlhf_pipe.pipeline.run_ahead).
        self._snapshots: dict[int, dict[str, Tensor]] = {}

    @torch.no_grad()
    def logprobs(self, samples: list[Sample]) -> list[Tensor]:
        return _per_sample(
            samples,
            self.infer_micro_bs,
            self.pad_id,
            self.device,
            lambda b: _logprobs(self.model, b, self.logit_chunk_tokens),
            self.packed,
        )

    def train(self, samples: list[Sample], loss: LossSettings, num_samples: int) -> dict:
        """Forward + backward over `samples` in train chunks; grads accumulate."""
        sums = _Sums()
        for chunk in chunks(samples, self.train_micro_bs):
            b = collate(chunk, self.pad_id, self.packed).to(self.device)
            with lora.dropout_active(self.model):
                logp, entropy = response_logprobs(
                    self.model, b, self.logit_chunk_tokens, with_entropy=True
                )
            R, mask = b.response_width, b.response_mask
            # Without a Forward-stage pass (StepPlan.actor_forward), the weights are those of
            # that pass: these log-probs stand for it, and the ratio is exactly 1.
            old = (
                logp.detach()
                if chunk[0].old_logp is None
                else pad_field(chunk, "old_logp", R).to(self.device)
            )
            adv = pad_field(chunk, "advantages", R).to(self.device)
            per_token, clipped = core.policy_loss(
                logp, old, adv, loss.policy_clip, dual_clip_c=loss.dual_clip_c
            )
            # The behaviour policy (vLLM's own log-probs). Samples without them (hf engine,
            # replayed) keep weight 1 and stay out of the behaviour metrics.
            has = [s.behaviour_logp is not None for s in chunk]  # host bools: no sync
            if any(has):
                beh = torch.zeros((len(chunk), R), dtype=torch.float32)
                for i, s in enumerate(chunk):
                    if s.behaviour_logp is not None:
                        beh[i, : s.num_actions] = s.behaviour_logp
                beh = beh.to(self.device)
                bmask = mask * torch.tensor(has, dtype=mask.dtype, device=mask.device)[:, None]
                diff = (old - beh) * bmask  # trainer minus vLLM, per token
                sums.add(
                    behaviour_tokens=bmask.sum(),
                    behaviour_logp_diff=diff.sum(),
                    behaviour_logp_abs_diff=diff.abs().sum(),
                )
                if loss.behaviour_correction is not None:
                    w, over = core.behaviour_weights(
                        old, beh, loss.behaviour_is_cap, loss.behaviour_correction
                    )
                    w = torch.where(bmask > 0, w, torch.ones_like(w))
                    per_token = per_token * w
                    # min/max do not add up: one key per chunk (first sample id, unique in a
                    # step), reduced by the trainer's step metrics.
                    first = chunk[0].sample_id
                    sums.add(
                        behaviour_is_weight=core.masked_sum(w, bmask),
                        behaviour_truncated=core.masked_sum(over, bmask),
                        **{
                            f"behaviour_chunk_max/{first}": torch.where(
                                bmask > 0, w, torch.full_like(w, -math.inf)
                            ).max(),
                            f"behaviour_chunk_min/{first}": torch.where(
                                bmask > 0, w, torch.full_like(w, math.inf)
                            ).min(),
                        },
                    )
            if loss.kl_loss_coeff:
                ref = pad_field(chunk, "ref_logp", R).to(self.device)
                kl_term = core.kl_penalty(logp, ref, "k3")
                per_token = per_token + loss.kl_loss_coeff * kl_term
                sums.add(kl_loss=core.masked_sum(kl_term.detach(), mask))
            self._backward(
                loss.ppo_loss_weight * _loss(per_token, mask, loss.loss_agg, num_samples)
            )
            with torch.no_grad():
                sums.add(
                    policy_loss=core.masked_sum(per_token, mask),
                    clip_frac=core.masked_sum(clipped, mask),
                    entropy=core.masked_sum(entropy, mask),
                    approx_kl=core.masked_sum(0.5 * (logp - old) ** 2, mask),
                    tokens=mask.sum(),
                )
        return sums.values

    def ptx(self, token_ids: list[list[int]], weight: float, total: int | None = None) -> dict:
        """Pretrain loss on plain text, token-mean over this step's PTX batch (`total`: its
        token count, when `token_ids` is one data-parallel shard of it)."""
        if total is None:
            total = sum(max(len(t) - 1, 0) for t in token_ids)
        sums = _Sums()
        for chunk in chunks(token_ids, self.train_micro_bs):
            width = max(len(t) for t in chunk)
            ids = torch.full((len(chunk), width), self.pad_id, dtype=torch.long)
            mask = torch.zeros((len(chunk), width), dtype=torch.float32)
            for i, t in enumerate(chunk):
                ids[i, : len(t)] = torch.tensor(t)
                mask[i, : len(t)] = 1
            ids, mask = ids.to(self.device), mask.to(self.device)
            with lora.dropout_active(self.model):
                logits = self.model(
                    input_ids=ids, attention_mask=mask.long(), use_cache=False
                ).logits
            nll = core.ptx_loss(logits[:, :-1], ids[:, 1:], mask[:, 1:])
            self._backward(weight * core.aggregate(nll, mask[:, 1:], total))
            sums.add(
                ptx_loss=core.masked_sum(nll.detach(), mask[:, 1:]), ptx_tokens=mask[:, 1:].sum()
            )
        return sums.values

    def named_weights(self):
        if lora.has_lora(self.model):
            tensors = (
                lora.adapter_tensors(self.model)
                if self.lora_sync == "adapter"
                else lora.merged_tensors(self.model)
            )
            return iter(tensors.items())
        return ((name, p.detach()) for name, p in self.model.state_dict().items())

    def join_weights(self) -> None:
        """Nothing to join: the weights are whole on this rank (see rlhf_pipe.zero)."""

    # The direct weight sync (rlhf_pipe.rollout.nccl_sync: NCCL, or gloo on the CPU); the
    # controller drives it.
    def weight_sync_address(self):
        from rlhf_pipe.rollout.nccl_sync import free_address

        return free_address()

    def init_weight_sender(
        self, host: str, port: int, world_size: int, backend: str, timeout_s: float
    ) -> None:
        from rlhf_pipe.rollout.nccl_sync import WeightSender

        self._weight_sender = WeightSender(host, port, world_size, self.device, backend, timeout_s)

    def weight_layout(self, bucket_bytes: int):
        from rlhf_pipe.rollout.nccl_sync import bucket_layout

        return bucket_layout(self.named_weights(), bucket_bytes)

    def snapshot_weights(self, version: int) -> None:
        from rlhf_pipe.rollout.nccl_sync import WeightSender

        self._snapshots[version] = WeightSender.snapshot(self.named_weights())

    def broadcast_weights(self, layout, version: int | None = None) -> int:
        if version is None:
            return self._weight_sender.send(self.named_weights(), layout)
        tensors = self._snapshots[version]
        for v in [v for v in self._snapshots if v <= version]:  # applied, or superseded
            del self._snapshots[v]
        return self._weight_sender.send(tensors.items(), layout)


class CriticRole(_Trainable):
    """The critic: values for the Forward stage, clipped value-loss updates for Train."""

    @torch.no_grad()
    def values(self, samples: list[Sample]) -> list[Tensor]:
        return _per_sample(
            samples,
            self.infer_micro_bs,
            self.pad_id,
            self.device,
            lambda b: token_values(self.model, b),
            self.packed,
        )

    def train(self, samples: list[Sample], loss: LossSettings, num_samples: int) -> dict:
        sums = _Sums()
        for chunk in chunks(samples, self.train_micro_bs):
            b = collate(chunk, self.pad_id, self.packed).to(self.device)
            with lora.dropout_active(self.model):
                values = token_values(self.model, b)
            R, mask = b.response_width, b.response_mask
            old = pad_field(chunk, "values", R).to(self.device)
            returns = pad_field(chunk, "returns", R).to(self.device)
            per_token, clipped = core.value_loss(values, old, returns, loss.value_clip)
            self._backward(
                loss.value_loss_weight * _loss(per_token, mask, loss.loss_agg, num_samples)
            )
            with torch.no_grad():
                sums.add(
                    value_loss=core.masked_sum(per_token, mask),
                    value_clip_frac=core.masked_sum(clipped, mask),
                    values=core.masked_sum(values, mask),
                    critic_tokens=mask.sum(),
                )
        return sums.values


class ReferenceRole(_InProcess):
    """`offload`: the weights wait in host memory between calls (placement_config.
    ref_reward_offload), so a GPU shared with training holds them only while they run.
    `packed`: see _Trainable."""

    def __init__(
        self,
        model,
        pad_id: int,
        infer_micro_bs: int,
        offload: bool = False,
        packed: bool = False,
        logit_chunk_tokens: int = 0,
    ):
        self.model, self.pad_id, self.infer_micro_bs = model.eval(), pad_id, infer_micro_bs
        self.packed = packed
        self.logit_chunk_tokens = logit_chunk_tokens
        self.model.requires_grad_(False)
        self.device = next(model.parameters()).device
        self.offload = offload
        if offload:
            self.model.to("cpu")

    @torch.no_grad()
    def logprobs(self, samples: list[Sample]) -> list[Tensor]:
        with on_device(self.model, self.device, self.offload):
            return _per_sample(
                samples,
                self.infer_micro_bs,
                self.pad_id,
                self.device,
                lambda b: _logprobs(self.model, b, self.logit_chunk_tokens),
                self.packed,
            )


@contextmanager
def on_device(model: nn.Module, device: torch.device, offload: bool):
    """Run `model` on `device`; with `offload`, it goes back to host memory afterwards."""
    if not offload:
        yield
        return
    model.to(device)
    try:
        yield
    finally:
        model.to("cpu")


@dataclass
class Scorer:
    """One term of the reward: `weight` x score. `impl` is a reward model (nn.Module, scored at
    each row's last token) or a callable fn(prompts, responses) -> list of numbers (a rule
    function, or rlhf_pipe.rewards.http.HTTPRewardModel)."""

    name: str
    weight: float
    kind: str  # "model" | "remote" | "function"
    impl: object


class RewardRole(_InProcess):
    """The reward: the weighted sum of its scorers.

    `scores` gives each sample a (1 + K,) tensor: the weighted total first, then the K scorers'
    own unweighted scores in `names` order (logged as reward/<name>). Clipping and
    normalisation later apply to the total only. `packed_scorers`: the learned scorers that
    run on PackedBatch chunks.
    """

    def __init__(
        self,
        scorers: list[Scorer],
        pad_id: int,
        infer_micro_bs: int,
        offload: bool = False,
        packed_scorers: Iterable[str] = (),
    ):
        if not scorers:
            raise ValueError("a reward role needs at least one scorer")
        self.scorers, self.pad_id, self.infer_micro_bs = list(scorers), pad_id, infer_micro_bs
        self.offload = offload  # learned scorers wait in host memory (see ReferenceRole)
        self.packed_scorers: frozenset[str] = frozenset(packed_scorers)
        self._devices = {}
        for sc in self.scorers:
            if sc.kind == "model":
                sc.impl.eval().requires_grad_(False)
                self._devices[sc.name] = next(sc.impl.parameters()).device
                if offload:
                    sc.impl.to("cpu")

    @property
    def names(self) -> list[str]:
        return [sc.name for sc in self.scorers]

    def set_function(self, fn) -> None:
        """Replace the rule-function scorers by `fn` (name 'reward_fn', weight 1); model and
        remote scorers stay."""
        self.scorers = [sc for sc in self.scorers if sc.kind != "function"]
        self.scorers.append(Scorer("reward_fn", 1.0, "function", fn))

    @torch.no_grad()
    def scores(self, samples: list[Sample]) -> list[Tensor]:
        parts = torch.stack([self._score(sc, samples) for sc in self.scorers], dim=1)  # (b, K)
        total = torch.zeros(len(samples), dtype=torch.float32)
        for k, sc in enumerate(self.scorers):  # a plain sum: weight 1 scorers add up exactly
            total += parts[:, k] if sc.weight == 1.0 else sc.weight * parts[:, k]
        return list(torch.cat([total[:, None], parts], dim=1).unbind(0))

    def _score(self, sc: Scorer, samples: list[Sample]) -> Tensor:
        """(b,) float32 scores of one scorer."""
        if sc.kind == "model":
            device = self._devices[sc.name]
            out = []
            with on_device(sc.impl, device, self.offload):
                for chunk in chunks(samples, self.infer_micro_bs):
                    b = collate(chunk, self.pad_id, sc.name in self.packed_scorers).to(device)
                    out.append(sequence_scores(sc.impl, b).float().cpu())  # one copy per chunk
            return torch.cat(out)
        values = sc.impl([s.prompt_text for s in samples], [s.response_text for s in samples])
        if len(values) != len(samples):
            raise ValueError(
                f"reward scorer {sc.name!r} returned {len(values)} scores for "
                f"{len(samples)} samples"
            )
        return torch.tensor([float(v) for v in values], dtype=torch.float32)


# ----------------------------------------------------------------------------- helpers


def choose_packing(model: nn.Module, mode, role: str, source: str = "config") -> bool:
    """train_config.pack_sequences for one model.

    'auto' packs only where attention has a variable-length kernel (flash attention). With
    sdpa or eager attention a packed row of T tokens gets a dense T x T block mask: measured
    slower than padding when samples reach a chunk in completion order, whose lengths are
    close already (BENCHMARKS.md, "Packed or padded"). True packs with any attention that keeps
    the samples apart, or fails in one line; False pads."""
    if mode is False:
        return False
    ok, why = packing_supported(model)  # run-time: the loaded model's attention
    if mode is True:
        if not ok:
            raise ValueError(
                f"{source}: train_config.pack_sequences=True, but {role} cannot pack: {why}"
            )
        return True
    return ok and attention_implementation(model) in VARLEN_ATTENTION


def _logprobs(model, b, chunk_tokens: int) -> Tensor:
    return response_logprobs(model, b, chunk_tokens)[0]


def _per_sample(samples, size, pad_id, device, fn, packed: bool) -> list[Tensor]:
    out = []
    for chunk in chunks(samples, size):
        b = collate(chunk, pad_id, packed).to(device)
        rows = fn(b).float().cpu()  # one device->host copy per chunk
        out.extend(rows[i, : s.num_actions].clone() for i, s in enumerate(chunk))
    return out


class _Sums:
    """Detached metric sums; no host sync until the trainer reads them."""

    def __init__(self):
        self.values: dict[str, Tensor] = {}

    def add(self, **kw):
        for k, v in kw.items():
            v = v.detach().float()
            self.values[k] = self.values[k] + v if k in self.values else v
