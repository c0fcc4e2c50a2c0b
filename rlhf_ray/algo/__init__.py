"""Pure torch math of RLHF: losses, advantages, KL. Tensors and floats in, tensors out; no Ray."""
