"""`rlhf-ray eval`: reward models on preference pairs, policies on held-out prompts."""
