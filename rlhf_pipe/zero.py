"""Actor and critic under DeepSpeed ZeRO-2/3; reference and reward partitioned by ZeRO-3.

The roles keep the interface of rlhf_pipe.roles; only where the gradients live changes.

How the one-normaliser-per-step rule (docs/architecture.md) survives DeepSpeed:
- `managed_gradient_accumulation: False`: `engine.backward` only accumulates (ZeRO-2/3 reduce
  each backward into the rank's partition) and `engine.step()` is the accumulation boundary.
  So the Train stage can call `train()` any number of times before the step, as without
  DeepSpeed.
- The backward pass is of the SUMMED per-token loss. The divisor (the batch's token count) is
  known only in `prepare_step`; there it becomes the ZeRO optimizer's static loss scale.
  DeepSpeed divides the accumulated gradients by the loss scale inside `step()`, and
  clips on the norm divided by it: exactly "divide once, then clip". DeepSpeed averages over
  the data-parallel ranks while rlhf_pipe sums, so the scale is divisor / dp.
- The scale is 1 during every backward (ZeRO multiplies the loss by it) and back to 1 after the
  step.
- ZeRO-2/3 reduce during each backward (and ZeRO-3 gathers weights in each forward), so every
  data-parallel rank must make the same number of calls. A rank with fewer chunks makes
  zero-weight passes (`pad_to`): a one-token forward whose output times 0 is backpropagated.
  Its gradients are exact zeros, so the result is unchanged.

Import-light: deepspeed is imported only when a role is built.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
import os
import socket
import threading
import time
from pathlib import Path

import torch

from rlhf_pipe import optim_state
from rlhf_pipe.checkpoint import CheckpointError
from rlhf_pipe.models import save_hf
from rlhf_pipe.pipeline.batch import chunks
from rlhf_pipe.roles import CriticRole, PolicyRole, ReferenceRole, RewardRole, warmup_schedule
from rlhf_pipe.validation import zero_stage  # the deepspeed_config checks live there

logger = logging.getLogger(__name__)


def offloads_optimizer(ds: dict) -> bool:
    off = (ds.get("zero_optimization") or {}).get("offload_optimizer") or {}
    return off.get("device", "none") == "cpu"


def engine_config(ds: dict, tc, micro_bs: int, dp: int, trained: bool) -> dict:
    """The dict handed to deepspeed.initialize: the user's, plus what rlhf_pipe owns."""
    out = dict(ds)
    out.update(
        train_micro_batch_size_per_gpu=micro_bs,
        gradient_accumulation_steps=1,
        train_batch_size=micro_bs * dp,
        steps_per_print=2**31 - 1,
        zero_allow_untested_optimizer=True,
    )  # the client optimizer is torch's AdamW
    if trained:
        out["managed_gradient_accumulation"] = False  # step() is the boundary (module doc)
        out["gradient_clipping"] = tc.max_grad_norm or 0.0
        if offloads_optimizer(ds):
            # torch's AdamW steps the offloaded fp32 partitions on the CPU (see _make_optimizer).
            out.setdefault("zero_force_ds_cpu_optimizer", False)
    return out


def ensure_process_group(device: torch.device) -> None:
    """DeepSpeed needs torch.distributed: a one-rank gloo group when none exists (plain
    `rlhf-pipe train`). On a CPU the DeepSpeed accelerator must be 'cpu', set before
    deepspeed is first imported."""
    import torch.distributed as dist

    if device.type == "cpu":
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    os.environ.setdefault("LOCAL_RANK", "0")  # DeepSpeed asserts that a launcher set it
    if dist.is_initialized():  # torchrun, or in-process vLLM's own one-rank world
        return
    with socket.socket() as s:  # a free port for the one-rank store
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)


class _GroupMPU:
    """The role's data-parallel group, in the shape DeepSpeed asks of an 'mpu'. Without it
    DeepSpeed takes the whole world (every role's ranks) as its data-parallel group. There
    is no model parallelism: the model-parallel group is this rank alone."""

    def __init__(self, dp_group, self_group):
        self.dp_group, self.self_group = dp_group, self_group

    def get_data_parallel_group(self):
        return self.dp_group

    def get_data_parallel_rank(self):
        import torch.distributed as dist

        return dist.get_rank(group=self.dp_group)

    def get_data_parallel_world_size(self):
        import torch.distributed as dist

        return dist.get_world_size(group=self.dp_group)

    def get_model_parallel_group(self):
        return self.self_group

    def get_model_parallel_rank(self):
        return 0

    def get_model_parallel_world_size(self):
        return 1


def _groups(dp_group):
    """(dp group, a group of this rank alone). None: the whole (one-rank) world."""
    import torch.distributed as dist

    if dp_group is None:
        if dist.get_world_size() != 1:
            raise RuntimeError(
                "a DeepSpeed role in a multi-rank run needs its data-parallel "
                "group (rlhf_pipe.train creates one per DeepSpeed role)"
            )
        return dist.group.WORLD, dist.group.WORLD
    if dist.get_world_size(group=dp_group) == 1:
        return dp_group, dp_group
    return dp_group, dist.new_group([dist.get_rank()], use_local_synchronization=True)


# A DeepSpeed op's JIT build (cpu_adam, shm_comm) takes about a minute on 2 cores; torch waits
# on a build's lock file without a limit, so a lock left by a killed build hangs every later run.
STALE_BUILD_LOCK_S = 600.0


def stale_build_locks(root: Path, max_age_s: float, now: float) -> list[Path]:
    """Build locks under torch's extension folder (`root/<op>/lock`, or one level deeper in
    torch's per-Python default folders) older than `max_age_s` seconds at `now`."""
    if not root.is_dir():
        return []
    locks = [*root.glob("*/lock"), *root.glob("*/*/lock")]
    return sorted(p for p in locks if now - p.stat().st_mtime > max_age_s)


def _refuse_stale_build_locks() -> None:
    from torch.utils.cpp_extension import get_default_build_root

    root = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or get_default_build_root())
    stale = stale_build_locks(root, STALE_BUILD_LOCK_S, time.time())
    if stale:
        age = time.time() - stale[0].stat().st_mtime
        raise RuntimeError(
            f"{stale[0]}: a DeepSpeed op build lock {age:.0f} s old, left by a build that was "
            f"killed; DeepSpeed would wait on it for ever. Remove it if no build is running"
        )


def _initialize(model, optimizer, config: dict, dp_group):
    import deepspeed

    _refuse_stale_build_locks()
    group, alone = _groups(dp_group)
    if zero_stage(config) == 3:
        _scope_order_checks_to_dp_group()
    with _barriers_within(group):
        engine, *_ = deepspeed.initialize(
            model=model,
            optimizer=optimizer,
            config=config,
            mpu=_GroupMPU(group, alone),
            dist_init_required=False,
        )
    return engine


def _scope_order_checks_to_dp_group() -> None:
    """ZeRO-3 (deepspeed 0.19.8) checks in each first forward that the ranks agree on the
    module order, by broadcasts from global rank 0 over the whole world. Here rank 0 is
    the controller, which never joins: a hang. The same check, over the data-parallel group
    (DeepSpeed's global mpu: one DeepSpeed group per rank)."""
    import torch.distributed as dist
    from deepspeed.accelerator import get_accelerator
    from deepspeed.runtime.zero import partition_parameters, partitioned_param_coordinator, stage3
    from deepspeed.utils import groups

    def same_on_dp_ranks(ints) -> None:
        group = groups._get_data_parallel_group()
        src = dist.get_global_rank(group, 0)
        device = get_accelerator().current_device_name()
        mine = torch.tensor([len(ints), *ints], dtype=torch.long, device=device)
        first = torch.tensor([len(ints)], dtype=torch.long, device=device)
        dist.broadcast(first, src=src, group=group)
        theirs = mine.clone() if first.item() == len(ints) else None
        if theirs is not None:
            dist.broadcast(theirs, src=src, group=group)
        if theirs is None or not torch.equal(theirs, mine):
            raise RuntimeError(
                f"ZeRO-3: data-parallel rank {dist.get_rank(group)} disagrees "
                f"with rank 0 on the module/parameter order"
            )

    for module in (partition_parameters, partitioned_param_coordinator, stage3):
        module.assert_ints_same_as_other_ranks = same_on_dp_ranks


@contextlib.contextmanager
def _barriers_within(group):
    """ZeRO-3's optimizer set-up calls barriers on the whole world (deepspeed 0.19.8,
    stage3.py), which the other roles' ranks never join: a hang. While the engine is built,
    a barrier without a group is one of the role's own group."""
    import deepspeed.comm as ds_comm

    world_barrier = ds_comm.barrier
    own = group

    def barrier(group=None, **kwargs):
        return world_barrier(group=own if group is None else group, **kwargs)

    ds_comm.barrier = barrier
    try:
        yield
    finally:
        ds_comm.barrier = world_barrier


def _gathered(params, modifier_rank=None):
    """ZeRO-3: the full tensors of `params` inside the block (a collective over the dp group)."""
    import deepspeed

    return deepspeed.zero.GatheredParameters(params, modifier_rank=modifier_rank)


def _named_full_weights(model, stage: int):
    """(name, full tensor) of every state_dict entry. ZeRO-3 gathers one module at a time,
    so the full model is never resident at once (every dp rank must iterate alongside)."""
    if stage < 3:
        yield from ((n, t.detach()) for n, t in model.state_dict().items())
        return
    persistent = {n for n, _ in model.state_dict().items()}
    for prefix, module in model.named_modules():
        params = list(module.named_parameters(recurse=False))
        buffers = [
            (n, b)
            for n, b in module.named_buffers(recurse=False)
            if f"{prefix}.{n}".lstrip(".") in persistent
        ]
        if not params and not buffers:
            continue
        with _gathered([p for _, p in params]):
            for n, t in params + buffers:
                yield f"{prefix}.{n}".lstrip("."), t.detach().clone()


def _load_full_weights(model, weights: dict, stage: int, folder: str) -> None:
    """Copy `weights` into the model's parameters (ZeRO-3: gathered, rank 0's copy wins)."""
    names = {
        f"{prefix}.{n}".lstrip(".")
        for prefix, module in model.named_modules()
        for n, _ in module.named_parameters(recurse=False)
    }
    missing = sorted(names - set(weights))
    unexpected = sorted(set(weights) - names)
    if unexpected or [k for k in missing if "rotary" not in k]:
        raise CheckpointError(
            f"{folder}: weights do not match the model "
            f"(missing {missing[:3]}, unexpected {unexpected[:3]})"
        )
    for prefix, module in model.named_modules():
        params = list(module.named_parameters(recurse=False))
        if not params:
            continue
        ctx = (
            _gathered([p for _, p in params], modifier_rank=0)
            if stage == 3
            else contextlib.nullcontext()
        )
        with ctx, torch.no_grad():
            for n, p in params:
                key = f"{prefix}.{n}".lstrip(".")
                if key in weights:
                    p.copy_(weights[key].to(p.dtype))


def _serial(method):
    """One call at a time per role. In one process the Forward and Train stages are threads
    that share the actor; ZeRO-3 gathers and releases weights per module in each forward,
    which two interleaved calls would undo under each other (the distributed runner already
    serialises a rank's calls)."""

    @functools.wraps(method)
    def locked(self, *args, **kwargs):
        with self._lock:
            return method(self, *args, **kwargs)

    return locked


class _ZeroTrainable:
    """Mixed into PolicyRole / CriticRole: the same methods, with model and optimizer under
    a DeepSpeed engine. See the module docstring for the normaliser."""

    def __init__(self, model, pad_id, *, ds_config: dict, dp_group=None, **kw):
        # builds torch AdamW + the warm-up schedule
        super().__init__(model, pad_id, dp_group=dp_group, **kw)
        if offloads_optimizer(ds_config):
            self._use_cpu_adam(kw)
        self.stage = zero_stage(ds_config)
        self.engine = _initialize(self.model, self.optimizer, ds_config, dp_group)
        self.model = self.engine.module
        self.zero = self.engine.optimizer
        self.dp_size = self.engine.dp_world_size
        self.dp_rank = torch.distributed.get_rank(group=self.engine.data_parallel_group)
        self._ptx_scale = 1.0
        self._lock = threading.RLock()

    def _use_cpu_adam(self, kw) -> None:
        """Offloaded fp32 partitions step on the CPU: DeepSpeed's vectorised CPU Adam (a C++
        extension, built on first use: ~4 min on a 2-core machine), else torch's AdamW."""
        try:
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            opt = DeepSpeedCPUAdam(
                [p for p in self.model.parameters() if p.requires_grad],
                lr=kw["lr"],
                betas=tuple(kw["betas"]),
                eps=kw["eps"],
                weight_decay=kw["weight_decay"],
                adamw_mode=True,
            )
        except Exception as e:  # no compiler: torch's AdamW gives the same update, slower
            logger.warning(
                "DeepSpeedCPUAdam unavailable (%s: %s); "
                "stepping the offloaded optimizer with torch.optim.AdamW",
                type(e).__name__,
                e,
            )
            return
        self.optimizer, self.scheduler = opt, warmup_schedule(opt, kw["warmup_steps"])

    # ---------------------------------------------------------------- backward, padding

    def _backward(self, loss) -> None:
        loss = loss * self._ptx_scale if self._ptx_scale != 1.0 else loss
        self.engine.backward(loss, scale_wrt_gas=False)
        # engine.forward() would do this at the start of the next forward: close this backward
        # (ZeRO-3 accumulates into, rather than overwrites, the partitions after it). The
        # roles call the module itself: the critic's per-token values bypass its forward().
        self.zero.clear_backward_seen_flag()

    def _dummy_output(self):
        ids = torch.full((1, 1), self.pad_id, dtype=torch.long, device=self.device)
        return self.model(input_ids=ids, use_cache=False).logits

    def _pad(self, n: int, train: bool) -> None:
        """n zero-weight passes, so this rank joins as many collectives as its peers."""
        for _ in range(max(n, 0)):
            if train:
                self._backward(self._dummy_output().sum() * 0.0)
            else:
                with torch.no_grad():
                    self._dummy_output()

    @_serial
    def train(self, samples, loss, num_samples, pad_to: int = 0) -> dict:
        out = super().train(samples, loss, num_samples) if samples else {}
        self._pad(pad_to - len(chunks(samples, self.train_micro_bs)), train=True)
        return out

    # ---------------------------------------------------------------- the step

    @_serial
    def divide_grads(self, divisor: float) -> None:
        # Grads live in ZeRO's partitions: instead of dividing them now, later backward
        # passes (PTX) are multiplied by `divisor` and prepare_step divides all of it once:
        # (G + d * P) / d = G / d + P.
        self._ptx_scale *= divisor

    @_serial
    def prepare_step(self, grad_divisor: float):
        """Finish the accumulation and return the true pre-clip norm (a tensor), before any
        weight changes, so the caller can still drop a non-finite update of either model."""
        from deepspeed.runtime.utils import is_invalid_grad_norm

        scale = grad_divisor * self._ptx_scale / self.dp_size
        self._ptx_scale = 1.0
        self.zero.loss_scale = scale
        # What engine.step() would do first; apply_step then does the rest of it.
        self.zero.finalize_gradient_accumulation_boundary()
        if self.stage == 3:
            from deepspeed.runtime.utils import combine_grad_norm_groups

            scaled = combine_grad_norm_groups(self.zero._get_norm_groups())
        else:
            scaled = self.zero.scaled_global_norm()
        scaled = torch.as_tensor(scaled, dtype=torch.float32).detach().cpu()
        if is_invalid_grad_norm(scaled):  # DeepSpeed's norm helpers report NaN/inf as -1
            return torch.tensor(math.nan)
        return scaled / scale

    @_serial
    def apply_step(self, norm) -> dict:
        # engine.step() minus the finalising prepare_step did (a second one fails in ZeRO-2):
        # the two calls of DeepSpeed's own _take_model_step. step() divides by the loss scale
        # (the normaliser), clips, runs AdamW and copies the result into the module.
        self.zero.step()
        self.zero.zero_grad(set_to_none=True)
        self.zero.loss_scale = 1.0
        self.scheduler.step()
        return {"grad_norm": norm.detach(), "lr": self.scheduler.get_last_lr()[0]}

    @_serial
    def drop_grads(self) -> None:
        """Forget the accumulated gradients without updating anything: the start of ZeRO's
        own step() and its overflow branch (deepspeed 0.19.8; tests/test_zero.py
        covers ZeRO-2, ZeRO-2 offload and ZeRO-3 offload)."""
        z = self.zero
        if self.stage == 3:
            z._pre_step()  # the next backward starts a new accumulation
            z._overflow_clean_up(z.loss_scale)
        else:
            from deepspeed.runtime.zero.stage_1_and_2 import INITIAL_MICRO_STEP_ID

            z.micro_step_id = INITIAL_MICRO_STEP_ID
            z._wait_for_offload_copies()
            z.zero_grad(set_to_none=True)
            z._release_preflattened_grad_buffers()
            if z.cpu_offload:
                z._offload_accumulated_param_ids = set()
                z.reset_cpu_buffers()
            else:
                for k in z.averaged_gradients:
                    z.averaged_gradients[k] = None
                    z.all_grad_tensors[k] = None
        z.loss_scale = 1.0
        self._ptx_scale = 1.0

    # ---------------------------------------------------------------- weights, state

    def named_weights(self):
        with self._lock:  # held while the caller iterates (a generator)
            yield from _named_full_weights(self.model, self.stage)

    def join_weights(self) -> None:
        """ZeRO-3, a rank other than the first: take part in the gathers of the first's
        named_weights (the tensors are dropped here)."""
        for _ in self.named_weights():
            pass

    @_serial
    def save(self, out_dir: str) -> None:
        # Every dp rank gathers (ZeRO-3); the group asks rank 0 only to write.
        tensors = {n: t.cpu() for n, t in self.named_weights()}
        if self.dp_rank == 0:
            save_hf(self.model, out_dir, state_dict=tensors)

    @_serial
    def load_weights_from(self, folder: str) -> None:
        from safetensors.torch import load_file

        weights = {}
        for f in sorted(Path(folder).glob("*.safetensors")):
            weights.update(load_file(str(f)))
        _load_full_weights(self.model, weights, self.stage, folder)
        # The fp32 master partitions follow the loaded weights (a training state loaded
        # afterwards replaces them with the exact fp32 values).
        self.zero._restore_from_bit16_weights()

    @_serial
    def training_state(self) -> dict:
        """The universal state (rlhf_pipe.optim_state), gathered by parameter name. Every dp
        rank must call it (the gathers are collectives, made in the model's parameter order);
        the first returns the state, the others only their rank."""
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

        step = self._flat_step()
        if step is not None:
            self._link_moments()
        # copy: a ZeRO-3 gather is a view of a padded buffer (torch.save would keep it all)
        host = functools.partial(torch.Tensor.to, device="cpu", dtype=torch.float32, copy=True)
        named, params = dict(self.model.named_parameters()), {}
        for name in optim_state.trained_names(self.model):
            p = named[name]
            entry = {"fp32": host(safe_get_full_fp32_param(p).detach())}
            if step is not None:
                entry.update(
                    {
                        k: host(safe_get_full_optimizer_state(p, k).detach())
                        for k in optim_state.MOMENTS
                    },
                    step=step,
                )
            params[name] = entry
        if self.dp_rank != 0:
            return {"dp_rank": self.dp_rank}
        return {
            "format": optim_state.FORMAT,
            "params": params,
            "layout": f"ZeRO-{self.stage} over {self.dp_size} rank(s)",
            "lr": [g["lr"] for g in self.optimizer.param_groups],
            "scheduler": self.scheduler.state_dict(),
        }

    @_serial
    def load_training_state(self, state: dict) -> None:
        """The universal state (any layout) or the per-rank format of the same ZeRO stage and
        dp size written before; every dp rank gets the whole `state`."""
        if optim_state.is_universal(state):
            self._load_universal(state)
            return
        ranks = state.get("ranks", [state])
        first = ranks[0]
        if "zero" not in first:
            raise CheckpointError(
                "the checkpoint's optimizer state is plain AdamW's per-rank "
                f"format, this run is ZeRO-{self.stage}: resume with the same "
                f"deepspeed_config"
            )
        if (first["zero_stage"], len(ranks)) != (self.stage, self.dp_size):
            raise CheckpointError(
                f"the checkpoint's optimizer state is ZeRO-{first['zero_stage']} over "
                f"{len(ranks)} rank(s) in the per-rank format, this run is ZeRO-{self.stage} "
                f"over {self.dp_size}: resume with the same ZeRO stage and data-parallel size"
            )
        ranks = sorted(ranks, key=lambda s: s["dp_rank"])
        self.zero.load_state_dict(
            [s["zero"] for s in ranks], load_optimizer_states=True, load_from_fp32_weights=True
        )
        self.scheduler.load_state_dict(ranks[self.dp_rank]["scheduler"])
        if self._flat_step() is not None:
            self._link_moments()

    # The fp32 partitions the base optimizer steps (its state is keyed by them).
    def _flats(self) -> list:
        return list(
            self.zero.fp32_partitioned_groups_flat
            if self.stage == 3
            else self.zero.single_partition_of_fp32_groups
        )

    def _flat_step(self) -> float | None:
        """Adam's step count; None: never stepped. ZeRO steps all its flat partitions at once,
        so their counts are equal."""
        base = self.zero.optimizer
        return max(
            (
                float(base.state[f]["step"])
                for f in self._flats()
                if "step" in base.state.get(f, {})
            ),
            default=None,
        )

    def _load_universal(self, state: dict) -> None:
        from deepspeed.utils import safe_set_full_fp32_param, safe_set_full_optimizer_state

        names = optim_state.trained_names(self.model)
        optim_state.check_names(state, names)
        step = optim_state.common_step(state)
        if step is not None:
            self._init_flat_state(step)
        params = dict(self.model.named_parameters())
        for name in names:  # setting is local to each rank: every rank keeps its own slice
            p, entry = params[name], state["params"][name]
            safe_set_full_fp32_param(p, entry["fp32"].to(self.device, torch.float32))
            for k in optim_state.MOMENTS if step is not None else ():
                value = entry.get(k)  # a parameter plain AdamW never stepped: zero moments
                value = torch.zeros_like(entry["fp32"]) if value is None else value
                safe_set_full_optimizer_state(p, value.to(self.device, torch.float32), k)
        # The model's (bf16) weights follow the masters, as after a ZeRO step.
        if self.stage == 3:
            for i in range(len(self._flats())):
                self.zero._reassign_or_swap_out_partitioned_parameters(i)
        else:
            self.zero.update_lp_params()
        optim_state.set_lrs(self.optimizer, state)
        self.scheduler.load_state_dict(state["scheduler"])

    def _init_flat_state(self, step: float) -> None:
        """Adam's state for each flat partition at `step` (zero moments, filled by name next).
        A fresh run has none until its first step: torch's AdamW and DeepSpeedCPUAdam create
        it lazily, and ZeRO-2 links each parameter's slice of it after that first step."""
        base = self.zero.optimizer
        int_step = not isinstance(base, torch.optim.AdamW)  # DeepSpeedCPUAdam counts in ints
        for flat in self._flats():
            st = base.state[flat]
            st["step"] = int(step) if int_step else torch.tensor(step, dtype=torch.float32)
            for k in optim_state.MOMENTS:
                if k not in st:
                    st[k] = torch.zeros_like(flat)
        self._link_moments()

    def _link_moments(self) -> None:
        """ZeRO-2 reads a parameter's moments through views into the flat state, made after
        the first step; a new state tensor (or ZeRO's own load_state_dict) leaves them stale."""
        if self.stage != 3:
            self.zero._hp_optimizer_states_linked = False
            self.zero._lazy_init_hp_params_optimizer_state()


class ZeroPolicyRole(_ZeroTrainable, PolicyRole):
    @_serial
    def logprobs(self, samples, pad_to: int = 0):
        out = super().logprobs(samples)
        if self.stage == 3:
            self._pad(pad_to - len(chunks(samples, self.infer_micro_bs)), train=False)
        return out

    @_serial
    def ptx(self, token_ids, weight, total=None, pad_to: int = 0) -> dict:
        out = super().ptx(token_ids, weight, total) if token_ids else {}
        self._pad(pad_to - len(chunks(token_ids, self.train_micro_bs)), train=True)
        return out


class ZeroCriticRole(_ZeroTrainable, CriticRole):
    @_serial
    def values(self, samples, pad_to: int = 0):
        out = super().values(samples)
        if self.stage == 3:
            self._pad(pad_to - len(chunks(samples, self.infer_micro_bs)), train=False)
        return out


def _zero3_inference(model, ds_config: dict, dp_group):
    """A forward-only model with its weights partitioned by ZeRO-3 (no optimizer)."""
    engine = _initialize(model, None, ds_config, dp_group)
    return engine.module


class ZeroReferenceRole(ReferenceRole):
    def __init__(self, model, pad_id, infer_micro_bs, *, ds_config, dp_group=None, packed=False):
        super().__init__(
            _zero3_inference(model, ds_config, dp_group), pad_id, infer_micro_bs, packed=packed
        )

    def logprobs(self, samples, pad_to: int = 0):
        out = super().logprobs(samples)
        for _ in range(max(pad_to - len(chunks(samples, self.infer_micro_bs)), 0)):
            with torch.no_grad():
                self.model(input_ids=torch.full((1, 1), self.pad_id, device=self.device))
        return out


class ZeroRewardRole(RewardRole):
    """The reward's learned scorers partitioned by ZeRO-3; remote and rule scorers as usual."""

    def __init__(
        self, scorers, pad_id, infer_micro_bs, *, ds_config, dp_group=None, packed_scorers=()
    ):
        for sc in scorers:
            if sc.kind == "model":
                sc.impl = _zero3_inference(sc.impl, ds_config, dp_group)
        super().__init__(scorers, pad_id, infer_micro_bs, packed_scorers=packed_scorers)

    def scores(self, samples, pad_to: int = 0):
        out = super().scores(samples)
        # ZeRO-3 gathers weights in every forward: each rank runs the same number.
        for _ in range(max(pad_to - len(chunks(samples, self.infer_micro_bs)), 0)):
            with torch.no_grad():
                for sc in self.scorers:
                    if sc.kind == "model":
                        device = next(sc.impl.parameters()).device
                        sc.impl(input_ids=torch.full((1, 1), self.pad_id, device=device))
        return out
