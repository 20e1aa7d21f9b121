"""The Python API: build from a config file, set prompts and a reward function, learn()."""

import pytest

from rlhf_pipe.trainer import RLHFTrainer
from tests.conftest import TINY_CONFIG

pytestmark = pytest.mark.slow


def test_api_trains_with_user_prompts_and_reward(tmp_path, fresh_engine):
    trainer = RLHFTrainer.from_config(
        str(TINY_CONFIG),
        {
            "train_config.work_dir": str(tmp_path),
            "train_config.tensorboard": False,
            "train_config.progress_bar": False,
        },
        engine=fresh_engine,
        console=False,
    )
    seen = []

    def shortness(prompts, responses):
        seen.extend(prompts)
        return [1.0 / (1 + len(r)) for r in responses]

    trainer.set_reward_fn(shortness)
    trainer.set_prompts(["only this prompt =>", "or this one =>"])
    history = trainer.learn(2)
    trainer.close()
    assert len(history) == 2 and trainer.version == 2
    assert set(seen) == {"only this prompt =>", "or this one =>"}
    assert len(seen) == 2 * 16
    with pytest.raises(ValueError, match="set_prompts: the list is empty"):
        trainer.set_prompts([])
