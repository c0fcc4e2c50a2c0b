"""PPO: experience batches, the driver loop, and actor launching."""
