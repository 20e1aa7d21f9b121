"""rlhf_pipe.errors.ConfigError: one line, and no credentials in it."""

from rlhf_pipe.errors import ConfigError


def test_a_url_in_the_message_is_shown_redacted():
    err = ConfigError("cfg.py: model_configs.reward.scorers.rm.url: bad 'https://u:secret@h:8/x'")
    assert "secret" not in str(err)
    assert str(err).startswith("cfg.py: model_configs.reward.scorers.rm.url: bad 'https://")


def test_the_message_stays_as_given_without_a_url():
    assert str(ConfigError("cfg.py: train_config.lr: expected a float")) == (
        "cfg.py: train_config.lr: expected a float"
    )
