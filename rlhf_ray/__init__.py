"""rlhf-ray: Ray-distributed RLHF (SFT -> reward model -> PPO)."""

__version__ = "0.1.0"
