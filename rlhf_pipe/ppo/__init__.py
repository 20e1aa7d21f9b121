"""PPO and critic-free RL math: pure tensor functions, no I/O, no config objects."""
