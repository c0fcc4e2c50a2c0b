"""Dataset formats: hh-rlhf, split preference pairs, self-instruct, prompt/completion, prompts."""
