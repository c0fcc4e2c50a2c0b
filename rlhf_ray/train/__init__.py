"""SFT and reward-model training as Ray Train jobs on DeepSpeed."""
