"""Which weight sync a torchrun run with run-ahead gets (rlhf_pipe.train._nccl_weight_sync).

The generation thread loads a snapshot of each step's weights between two steps' generations
(engine.load_weights, over gloo to remote engines); the NCCL broadcast sends the actor's live
weights. So with max_staleness >= 1, 'auto' takes gloo and 'nccl' is refused before any
engine starts. (On this CPU machine 'auto' is gloo anyway: NCCL needs GPUs.)"""

import pytest

from rlhf_pipe.placement import make_placement
from rlhf_pipe.run_args import UserError
from rlhf_pipe.train import _nccl_weight_sync, _role_ranks
from tests.conftest import tiny_config


def test_nccl_is_refused_with_run_ahead_naming_the_key(tmp_path):
    over = {"train_config.max_staleness": 1, "train_config.weight_sync_backend": "nccl"}
    cfg = tiny_config(tmp_path, **over)
    placement = make_placement(cfg)
    with pytest.raises(UserError, match="train_config.weight_sync_backend: 'nccl' cannot carry"):
        _nccl_weight_sync(cfg, placement, _role_ranks(placement))
