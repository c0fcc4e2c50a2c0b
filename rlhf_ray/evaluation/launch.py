"""The eval jobs on Ray: reward models and policies run in the same actor classes PPO uses.

`run_eval_rm` scores preference pairs with RewardModel actors; `run_eval_policy` samples held-out
prompts with a RolloutGenerator (vLLM) per policy, scores the samples with RewardModel actors, and
takes KL to the first policy with ReferenceModel actors. One model is loaded at a time; every
actor is stopped on the way out.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from actors.reference_model import ReferenceModel
from actors.reward_model import RewardModel
from actors.rollout_generator import RolloutGenerator
from rlhf_ray import ray_session
from rlhf_ray.algo.evaluation import sequence_kl
from rlhf_ray.config import Config, require_writable
from rlhf_ray.evaluation import policy_eval, rm_eval
from rlhf_ray.models.export import is_exported
from rlhf_ray.models.loading import load_tokenizer, require_safetensors
from rlhf_ray.models.provision import resolve_model
from rlhf_ray.ppo.launch import end_of_turn_suffix, role_options, role_request
from rlhf_ray.ppo.prompts import load_prompt_set
from rlhf_ray.ppo.run import resolve_model_paths
from rlhf_ray.roles import GeneratorRole, ReferenceRole, RewardRole, remote_call
from rlhf_ray.wire import SamplingSpec, pack

GENERATE_CHUNK = 32  # prompts per generate call (a progress step)
FORWARD_BATCH = 16  # sequences per reward / log-prob call


@dataclass
class PolicyEvalRequest:
    policies: list[str]  # model folders or known names; the first is the baseline
    reward_models: list[str]  # reward model folders
    data: str  # prompt file or folder (any format prompts can be read from)
    format: str = "auto"
    split: str = "test"  # which split by prompt: "test" (held out from every stage), "eval", "train" or "all"
    limit: int | None = None  # first N prompts of the split
    samples_per_prompt: int = 1
    names: list[str] = field(default_factory=list)  # display names (default: the folder names)


@dataclass
class RunModels:
    policies: list[Path]  # the run's starting policy, then its PPO model when exported
    reward: Path  # the run's reward model (ppo.reward_model, else rm/model)


def run_models(config: Config) -> RunModels:
    """The models a run's stages made (or its config names), as `eval` uses them by default."""
    if config.run.store is not None:
        config.run.store.fetch("eval")
    paths = resolve_model_paths(config)
    if paths.reward is None:
        raise ValueError(
            "ppo.rewards has no reward model (kind model), and evaluation judges with reward models: "
            "name one with --reward-model (eval policy) or --model (eval rm)"
        )
    ppo_model = (config.run.path / "ppo" / "model").resolve()
    return RunModels([paths.policy] + ([ppo_model] if is_exported(ppo_model) else []), paths.reward)


def run_start_vs_ppo(
    config: Config, split: str, limit: int | None, extra_reward_models: list[str] = (), samples_per_prompt: int = 1
) -> PolicyEvalRequest:
    """The request that compares a run's starting policy with its PPO model (named start / ppo) on a split
    of `data.prompts`, judged by the run's reward model and `extra_reward_models`."""
    found = run_models(config)
    return PolicyEvalRequest(
        policies=[str(p) for p in found.policies],
        reward_models=[str(found.reward), *extra_reward_models],
        data=config.data.prompts.path,
        format=config.data.prompts.format,
        split=split,
        limit=limit,
        samples_per_prompt=samples_per_prompt,
        names=["start", "ppo"][: len(found.policies)],
    )


def default_eval_dir(config: Config, kind: str) -> Path:
    return (config.run.path / "eval" / kind).resolve()


def share_run_models(config: Config, folders: list[Path]) -> None:
    """With an object-store run folder: every node's working copy of the run's models among `folders` up to
    date, wherever an eval actor starts."""
    if config.run.store is not None:
        ray_session.pull_on_every_node(config.run.store, folders)


def send_outputs(config: Config, out: Path) -> None:
    """With an object-store run folder: eval outputs inside the run folder go to the store."""
    if config.run.store is not None:
        config.run.store.push_paths(out)


def require_each_fits(stage: str, config: Config, roles: tuple[str, ...]) -> None:
    """The eval actors run one at a time: fail now, naming the actor, when no alive node can hold one of them."""
    for role in roles:
        ray_session.require_fits(stage, [role_request(config, role, f"the eval {role} actor")])


def _actor(cls, config: Config, role: str):
    """An eval actor of `role`, placed as the PPO actor of that role is (CPUs, GPUs, resources.role_resources)."""
    import ray

    options = {k: v for k, v in role_options(config, role).items() if k != "namespace"}  # (unnamed actors)
    return ray.remote(cls).options(**options)


def _scores_from(scorer):
    """score(prompts, responses) -> list of floats, on a RewardModel actor."""
    import ray

    return lambda prompts, responses: ray.get(remote_call(scorer, RewardRole.score, prompts, responses)).tolist()


def _stop(actor) -> None:
    import ray

    ray.kill(actor)


def _batches(n: int) -> list[range]:
    """Sample indices 0..n-1 in runs of FORWARD_BATCH, one reward / log-prob call each."""
    return [range(start, min(start + FORWARD_BATCH, n)) for start in range(0, n, FORWARD_BATCH)]


def display_names(paths: list[str], given: list[str]) -> list[str]:
    """Short names for report columns: the given ones, else the folder name; a run's stage folders (all
    named 'model') as `<run>/<stage>`."""
    if given:
        if len(given) != len(paths):
            raise ValueError(f"{len(given)} names given for {len(paths)} models")
        return given
    names = []
    for path in paths:
        p = Path(path)
        name = f"{p.parent.parent.name}/{p.parent.name}" if p.name == "model" else p.name
        names.append(name if name not in names else f"{name}#{len(names)}")
    return names


def run_eval_rm(config: Config, models: list[str], data: str, fmt: str, split: str, out: Path) -> dict:
    """Every reward model in `models` scores the pairs of `data` (narrowed to `split`); writes eval.json and
    report.md."""
    require_writable(out)
    folders = [require_safetensors(resolve_model(m)).resolve() for m in models]
    tokenizer = load_tokenizer(folders[0], config.model.trust_remote_code)
    pair_set = rm_eval.load_pair_set(config, data, fmt, split, tokenizer)
    print(f"[eval rm] data: {pair_set.description}", flush=True)
    print(f"[eval rm] Ray: {ray_session.connect(config.resources)}; outputs in {out}", flush=True)
    require_each_fits("eval rm", config, ("reward",))
    share_run_models(config, folders)
    models_scored = ray_session.run_interruptibly(lambda: _score_pairs_with_each(config, folders, pair_set, tokenizer))
    results = {"data": pair_set.description, "models": models_scored}
    rm_eval.write_results(results, out)
    send_outputs(config, out)
    print(f"[eval rm] done: {out / 'eval.json'}, {out / 'report.md'}", flush=True)
    return results


def _score_pairs_with_each(config: Config, folders: list[Path], pair_set, tokenizer) -> dict:
    """Each reward model in its own actor, one after the other: {display name: its path and summary}."""
    scored = {}
    for name, folder in zip(display_names([str(f) for f in folders], []), folders):
        scorer = _actor(RewardModel, config, "reward").remote(
            str(folder),
            dtype=config.model.dtype,
            normalize=False,
            clip=float("inf"),
            eos_token_id=tokenizer.eos_token_id,
            end_of_turn_suffix=[],
            trust_remote_code=config.model.trust_remote_code,
            precision=config.model.precision,
        )
        try:
            margins = rm_eval.score_pairs(
                _scores_from(scorer), pair_set.pairs, FORWARD_BATCH, progress=f"eval rm {name}"
            )
        finally:
            _stop(scorer)
        scored[name] = {"path": str(folder), **rm_eval.summarise(pair_set.pairs, margins)}
        overall = scored[name]["overall"]
        print(
            f"[eval rm] {name}: accuracy {overall['accuracy']:.3f} over {overall['pairs']} pairs, mean margin "
            f"{overall['mean_margin']:.3f}, ECE {overall['calibration_error']:.3f} (longer chosen: "
            f"{overall['longer_chosen']:.3f})",
            flush=True,
        )
    return scored


def run_eval_policy(config: Config, request: PolicyEvalRequest, out: Path) -> dict:
    """Sample, score and compare the policies of `request`; writes eval.json, report.md and the samples tables."""
    require_writable(out)
    folders = [require_safetensors(resolve_model(p)).resolve() for p in request.policies]
    reward_folders = [require_safetensors(resolve_model(r)).resolve() for r in request.reward_models]
    tokenizer = load_tokenizer(folders[0], config.model.trust_remote_code)
    prompt_config = _with_prompts(config, request)
    prompt_set = load_prompt_set(prompt_config, tokenizer, split=request.split)
    prompt_ids = prompt_set.token_ids[: request.limit]
    prompt_texts = [
        "\n".join(f"{m['role']}: {m['content']}" for m in example.prompt)
        for example in prompt_set.examples[: request.limit]
    ]
    print(f"[eval policy] prompts: {prompt_set.summary}; {len(prompt_ids)} evaluated", flush=True)
    print(f"[eval policy] Ray: {ray_session.connect(config.resources)}; outputs in {out}", flush=True)
    require_each_fits("eval policy", config, ("generator", "reference", "reward"))
    share_run_models(config, folders + reward_folders)
    names = display_names([str(f) for f in folders], request.names)
    reward_names = display_names([str(f) for f in reward_folders], [])

    def sample_and_score() -> list:
        policies = [
            _sample(config, folder, name, prompt_ids, request.samples_per_prompt, tokenizer)
            for folder, name in zip(folders, names)
        ]
        _kl_to_first(config, folders, policies, prompt_ids, tokenizer)
        suffix = end_of_turn_suffix(tokenizer)
        for rm_name, rm_folder in zip(reward_names, reward_folders):
            _score(config, rm_folder, rm_name, policies, prompt_ids, tokenizer, suffix)
        return policies

    policies = ray_session.run_interruptibly(sample_and_score)
    sampling = {
        "temperature": config.ppo.temperature,
        "top_p": config.ppo.top_p,
        "max_new_tokens": config.ppo.max_new_tokens,
        "samples_per_prompt": request.samples_per_prompt,
        "seed": config.run.seed,
    }
    results = {
        "prompts": f"{prompt_set.summary}; {len(prompt_ids)} evaluated",
        "sampling": sampling,
        "reward_models": {name: str(f) for name, f in zip(reward_names, reward_folders)},
        "policies": policy_eval.summarise(policies),
    }
    policy_eval.write_results(results, prompt_texts, policies, out)
    send_outputs(config, out)
    for line in policy_eval.summary_table(results):
        print(f"[eval policy] {line}", flush=True)
    print(f"[eval policy] done: {out / 'report.md'}, samples in {out / 'samples.html'}", flush=True)
    return results


def _with_prompts(config: Config, request: PolicyEvalRequest) -> Config:
    """The config with `data.prompts` pointed at the request's prompt source (the split rules stay the config's)."""
    import copy

    changed = copy.deepcopy(config)
    changed.data.prompts.path, changed.data.prompts.format, changed.data.prompts.limit = (
        request.data,
        request.format,
        None,
    )
    return changed


def _sample(config: Config, folder: Path, name: str, prompt_ids: list[list[int]], n: int, tokenizer):
    """One vLLM engine for this policy: every prompt answered `n` times with the run's sampling seed."""
    import ray
    from tqdm import tqdm

    ppo, model = config.ppo, config.model
    spec = SamplingSpec(
        max_new_tokens=ppo.max_new_tokens, temperature=ppo.temperature, top_p=ppo.top_p, n=n, seed=config.run.seed
    )
    generator = _actor(RolloutGenerator, config, "generator").remote(
        str(folder),
        max_lora_rank=config.lora.r,
        max_model_len=config.data.max_prompt_length + ppo.max_new_tokens,
        dtype=model.dtype,
        enforce_eager=ppo.vllm_enforce_eager,
        kv_cache_gib=ppo.vllm_kv_cache_gib,
        gpu_memory_utilization=ppo.vllm_gpu_memory_utilization,
        tensor_parallel_size=ppo.vllm_tensor_parallel_size,
        seed=config.run.seed,
        trust_remote_code=model.trust_remote_code,
        enable_lora=False,
        threads=config.resources.generator_threads,
        precision=model.precision,
    )
    samples = policy_eval.PolicySamples(name, str(folder), [], [], [])
    try:
        for start in tqdm(range(0, len(prompt_ids), GENERATE_CHUNK), desc=f"eval sample {name}", mininterval=2.0):
            chunk = prompt_ids[start : start + GENERATE_CHUNK]
            for rollout in ray.get(remote_call(generator, GeneratorRole.generate, chunk, spec, start)):
                samples.prompt_index.append(start + rollout.prompt_index)
                samples.responses.append(rollout.token_ids)
                samples.finished.append(rollout.finished)
    finally:
        _stop(generator)
    samples.texts = [tokenizer.decode(r, skip_special_tokens=True) for r in samples.responses]
    return samples


def _logprobs(config: Config, folder: Path, policy, prompt_ids, tokenizer, desc: str) -> list:
    """(per sample) the response-token log-probs of `policy`'s samples under the model in `folder`."""
    import ray

    model = _actor(ReferenceModel, config, "reference").remote(
        str(folder),
        config.model.dtype,
        config.ppo.temperature,
        config.model.trust_remote_code,
        precision=config.model.precision,
    )
    rows = []
    try:
        for index in _batches(len(policy.responses)):
            batch = pack(
                [prompt_ids[policy.prompt_index[i]] for i in index],
                [policy.responses[i] for i in index],
                tokenizer.pad_token_id,
            )
            logprobs = ray.get(remote_call(model, ReferenceRole.logprobs, batch))
            rows += [(logprobs[k], batch.response_mask[k]) for k in range(len(index))]
    finally:
        _stop(model)
    print(f"[eval policy] {desc}", flush=True)
    return rows


def _kl_to_first(config: Config, folders: list[Path], policies: list, prompt_ids, tokenizer) -> None:
    """KL(policy || first policy) per sample, on the policy's own samples (0 for the first policy)."""
    policies[0].kl = [0.0] * len(policies[0].responses)
    for folder, policy in zip(folders[1:], policies[1:]):
        own = _logprobs(config, folder, policy, prompt_ids, tokenizer, f"log-probs of {policy.name} under itself")
        first = _logprobs(
            config, folders[0], policy, prompt_ids, tokenizer, f"log-probs of {policy.name} under {policies[0].name}"
        )
        policy.kl = [float(sequence_kl(lp, base, mask)) for (lp, mask), (base, _) in zip(own, first)]


def _score(config: Config, folder: Path, name: str, policies: list, prompt_ids, tokenizer, suffix) -> None:
    """Raw scores of every policy's samples under one reward model."""
    import ray

    scorer = _actor(RewardModel, config, "reward").remote(
        str(folder),
        dtype=config.model.dtype,
        normalize=False,
        clip=float("inf"),
        eos_token_id=tokenizer.eos_token_id,
        end_of_turn_suffix=suffix,
        trust_remote_code=config.model.trust_remote_code,
        precision=config.model.precision,
    )
    try:
        for policy in policies:
            scores = []
            for index in _batches(len(policy.responses)):
                prompts = [prompt_ids[policy.prompt_index[i]] for i in index]
                responses = [policy.responses[i] for i in index]
                scores += ray.get(remote_call(scorer, RewardRole.score, prompts, responses)).tolist()
            policy.rewards[name] = scores
    finally:
        _stop(scorer)
