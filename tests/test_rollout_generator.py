"""RolloutGenerator built directly (no Ray): a real vLLM engine (CPU build here) over the tiny model."""

import os

import pytest
import torch

pytestmark = pytest.mark.component
PROMPTS = [[5, 6, 7, 8], [9, 10, 11]]


@pytest.fixture(scope="module")
def generator(tiny_model_dir):
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")  # engine in this process, no spawn from pytest
    from actors.rollout_generator import RolloutGenerator

    return RolloutGenerator(str(tiny_model_dir), max_lora_rank=8, max_model_len=512)


def learner_at(tiny_model_dir, version, scramble, targets=("q_proj", "k_proj", "v_proj", "o_proj")):
    from actors.policy_learner import PolicyLearner
    from rlhf_ray.config import LoraConfig, PPOConfig

    learner = PolicyLearner(
        str(tiny_model_dir),
        LoraConfig(r=8, alpha=16, target_modules=list(targets)),
        PPOConfig(rollout_batch_size=2, minibatch_size=2),
    )
    if scramble:  # a visibly different policy
        with torch.no_grad():
            for name, p in learner.model.named_parameters():
                if "lora_B" in name:
                    p.normal_(std=0.5, generator=torch.Generator().manual_seed(0))
    learner.version = version
    return learner


def adapter(tiny_model_dir, version, scramble):
    return learner_at(tiny_model_dir, version, scramble).export_adapter()


def test_seeded_generation_is_reproducible_and_reports_logprobs(generator):
    from rlhf_ray.wire import SamplingSpec

    spec = SamplingSpec(max_new_tokens=8, seed=1, n=2)
    first, again = generator.generate(PROMPTS, spec), generator.generate(PROMPTS, spec)
    assert [r.token_ids for r in first] == [r.token_ids for r in again]
    assert [r.prompt_index for r in first] == [0, 0, 1, 1]
    assert all(len(r.token_ids) == len(r.logprobs) == 8 and all(lp <= 0 for lp in r.logprobs) for r in first)


def test_a_seeded_batch_larger_than_one_prefill_step_works_and_repeats(generator):
    """More prompt tokens than one engine step takes: vLLM would prefill some prompt in chunks and
    then fail to rewind its CPU seeded generator, unless the generator turns chunked prefill off."""
    from rlhf_ray.wire import SamplingSpec

    prompts = [[(7 * i + j) % 500 + 10 for j in range(100)] for i in range(100)]  # 10,000 prompt tokens
    spec = SamplingSpec(max_new_tokens=4, seed=3)
    first, again = generator.generate(prompts, spec), generator.generate(prompts, spec)
    assert len(first) == 100 and [r.token_ids for r in first] == [r.token_ids for r in again]


def test_new_adapter_changes_outputs_and_old_version_restores_them(generator, tiny_model_dir):
    from rlhf_ray.wire import SamplingSpec

    spec = SamplingSpec(max_new_tokens=8, seed=3)
    base = [r.token_ids for r in generator.generate(PROMPTS, spec)]
    assert generator.load_adapter(1, adapter(tiny_model_dir, 1, scramble=True)) == 1
    changed = [r.token_ids for r in generator.generate(PROMPTS, spec)]
    assert changed != base
    assert generator.load_adapter(2, adapter(tiny_model_dir, 2, scramble=False)) == 2  # a zero LoRA update
    assert [r.token_ids for r in generator.generate(PROMPTS, spec)] == base
    generator.load_adapter(1, adapter(tiny_model_dir, 1, scramble=True))  # back to version 1
    assert [r.token_ids for r in generator.generate(PROMPTS, spec)] == changed and generator.current_version() == 1


def test_merged_weights_generate_what_the_adapter_does_and_replace_cached_prefixes(generator, tiny_model_dir):
    """The adapter on q_proj/v_proj/up_proj only: vLLM fuses q/k/v and gate/up, so the untouched k_proj
    and gate_proj must travel too. Prompts longer than a KV block (128 tokens on CPU) are generated
    first with the base weights, so a prefix cache kept across the reload would give the old policy's
    answers."""
    from rlhf_ray.wire import SamplingSpec

    prompts = PROMPTS + [[(3 * i) % 400 + 20 for i in range(200)], [(5 * i) % 400 + 30 for i in range(300)]]
    assert generator.llm.llm_engine.vllm_config.cache_config.block_size < 200
    spec = SamplingSpec(max_new_tokens=8, seed=5)
    targets = ("q_proj", "v_proj", "up_proj")
    zero = learner_at(tiny_model_dir, 3, scramble=False, targets=targets)
    assert generator.load_merged_weights(3, zero.export_merged_weights()) == 3
    base = generator.generate(prompts, spec)

    scrambled = learner_at(tiny_model_dir, 4, scramble=True, targets=targets)
    weights = scrambled.export_merged_weights()
    assert {name.rsplit(".", 2)[-2] for name in weights.tensors} == {
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    }
    generator.load_adapter(4, scrambled.export_adapter())
    with_adapter = generator.generate(prompts, spec)
    assert [r.token_ids for r in with_adapter] != [r.token_ids for r in base]

    assert generator.load_merged_weights(4, weights) == 4
    merged = generator.generate(prompts, spec)
    assert [r.token_ids for r in merged] == [r.token_ids for r in with_adapter]
    for a, b in zip(merged, with_adapter):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)

    generator.load_merged_weights(5, zero.export_merged_weights())  # back to the base weights
    assert [r.token_ids for r in generator.generate(prompts, spec)] == [r.token_ids for r in base]


def test_a_compiled_engine_generates_with_the_weights_reloaded_into_it(generator, tiny_model_dir):
    """PPO's default engine (ppo.vllm_enforce_eager=false, merged sync) runs a compiled graph. A graph that
    kept its own copies of the weights would go on sampling the SFT policy after every reload; it must
    sample what the eager engine samples with the same weights."""
    from vllm.config import CompilationMode

    from actors.rollout_generator import RolloutGenerator
    from rlhf_ray.wire import SamplingSpec

    compiled = RolloutGenerator(
        str(tiny_model_dir), max_lora_rank=8, max_model_len=512, enforce_eager=False, enable_lora=False
    )
    assert compiled.llm.llm_engine.vllm_config.compilation_config.mode != CompilationMode.NONE
    spec = SamplingSpec(max_new_tokens=8, seed=7)
    base = compiled.generate(PROMPTS, spec)
    weights = learner_at(tiny_model_dir, 6, scramble=True).export_merged_weights()
    compiled.load_merged_weights(6, weights)
    generator.load_merged_weights(6, weights)
    after, eager = compiled.generate(PROMPTS, spec), generator.generate(PROMPTS, spec)
    assert [r.token_ids for r in after] != [r.token_ids for r in base]
    assert [r.token_ids for r in after] == [r.token_ids for r in eager]
    for a, b in zip(after, eager):
        assert a.logprobs == pytest.approx(b.logprobs, abs=1e-4)
    compiled.load_merged_weights(7, learner_at(tiny_model_dir, 7, scramble=False).export_merged_weights())
    assert [r.token_ids for r in compiled.generate(PROMPTS, spec)] == [r.token_ids for r in base]


def test_a_bf16_mixed_generator_runs_vllm_in_bf16_and_takes_the_learners_fp32_weights(generator, tiny_model_dir):
    """model.precision bf16-mixed: the engine computes in bf16, fp32 merged weights from the learner reload
    into it (without vLLM's per-tensor narrowing warning) and change what it samples."""
    import logging

    from actors.rollout_generator import RolloutGenerator, narrowing_load_warnings
    from rlhf_ray.wire import SamplingSpec

    bf16 = RolloutGenerator(
        str(tiny_model_dir), max_lora_rank=8, max_model_len=512, enable_lora=False, precision="bf16-mixed"
    )
    assert bf16.llm.llm_engine.model_config.dtype == torch.bfloat16
    assert narrowing_load_warnings in logging.getLogger("vllm.model_executor.models.utils").filters
    narrowing = logging.LogRecord(
        "vllm",
        logging.WARNING,
        __file__,
        1,
        "Attempted to load weight %s with dtype %s into parameter with dtype %s",
        (),
        None,
    )
    other = logging.LogRecord("vllm", logging.WARNING, __file__, 1, "Attempted to load nested weight %r", (), None)
    assert not narrowing_load_warnings(narrowing) and narrowing_load_warnings(other)
    spec = SamplingSpec(max_new_tokens=8, seed=7)
    base = bf16.generate(PROMPTS, spec)
    bf16.load_merged_weights(8, learner_at(tiny_model_dir, 8, scramble=True).export_merged_weights())
    assert [r.token_ids for r in bf16.generate(PROMPTS, spec)] != [r.token_ids for r in base]
    assert generator.llm.llm_engine.model_config.dtype == torch.float32  # the default stays fp32


@pytest.mark.parametrize("replicas", [1, 2])
def test_a_generator_actor_on_half_a_cpu_computes_with_its_share_of_the_cores(tiny_model_dir, ray_local, replicas):
    """Ray gives an actor with under 2 CPUs one OpenMP thread; vLLM would keep it for the engine's life
    (generation at about half speed on 2 cores). The generator takes the cores it may use instead, split
    between the replicas that generate at the same time (2 replicas x 2 threads on 2 cores generated 5.6x slower)."""
    import ray

    from actors.rollout_generator import RolloutGenerator

    actor = ray.remote(num_cpus=0.5)(RolloutGenerator).remote(
        str(tiny_model_dir), max_lora_rank=8, max_model_len=64, enable_lora=False, threads_shared_by=replicas
    )
    try:
        threads = ray.get(actor.compute_threads.remote(), timeout=300)
        cores = ray.get(ray.remote(num_cpus=0)(lambda: len(os.sched_getaffinity(0))).remote())
        assert threads == {"torch_threads": max(1, cores // replicas), "OMP_NUM_THREADS": "1"}
    finally:
        ray.kill(actor)
