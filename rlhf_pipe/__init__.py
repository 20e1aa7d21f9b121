"""rlhf_pipe: micro-batch pipelined RLHF (PPO) with queue-fed stages.

Kept import-light on purpose: importing the package must not pull in vLLM, DeepSpeed or CUDA.
"""

__version__ = "0.1.0"
