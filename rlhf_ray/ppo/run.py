"""`rlhf-ray ppo`: set up the actors, run the iterations, checkpoint, resume, export."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from rlhf_ray import (
    dashboard_metrics,
    ray_session,
)
from rlhf_ray.algo.ppo import AdaptiveKLController, FixedKLController, explained_variance
from rlhf_ray.checkpoints import (
    CheckpointError,
    commit,
    newest_valid,
    prune,
    read_manifest,
    sha256_of,
    write_manifest,
)
from rlhf_ray.config import Config, require_writable, save_config
from rlhf_ray.models.checks import check_role, check_tokenizer
from rlhf_ray.models.export import is_exported, mark_exported
from rlhf_ray.models.loading import load_tokenizer, require_safetensors
from rlhf_ray.models.provision import resolve_model
from rlhf_ray.ppo.crew import ActorCrew, RoleLost
from rlhf_ray.ppo.driver import GeneratorWeights, finite_only, ppo_step
from rlhf_ray.ppo.launch import ModelPaths, actor_specs, function_name, launch_actors, role_requests
from rlhf_ray.ppo.prompts import load_prompt_set
from rlhf_ray.ppo.rollouts import OverlappedRollouts, PromptBatch, SyncRollouts
from rlhf_ray.rewards.function import load_function
from rlhf_ray.roles import LEARNER, LearnerRole
from rlhf_ray.run_log import MetricsLog, plot_curves, trim_jsonl
from rlhf_ray.storage import RunStore
from rlhf_ray.wire import SamplingSpec

DRIVER_STATE = "driver_state.json"  # iteration, KL coefficient, samples seen, counters
DRIVER_LOGS = ("metrics.jsonl", "samples.jsonl", "tensorboard")  # what the driver writes beside the checkpoints
CHECKPOINTS_KEPT = 2
EXTRA_ROUND_SEED = 7_919  # dynamic sampling's round r draws prompts and sampling seeds from seed + this * r
PLOTTED = [
    "reward_mean",
    "reward_std",
    "kl",
    "entropy",
    "response_length",
    "finished_fraction",
    "value_loss",
    "explained_variance",
    "clip_fraction",
    "approx_kl",
    "generated_tokens_per_s",
    "seconds_iteration",
]


@dataclass
class PPOResult:
    output_dir: Path
    iterations: int
    final_metrics: dict


def resolve_model_paths(config: Config) -> ModelPaths:
    run = config.run.path.resolve()
    if config.ppo.policy_model:
        policy = resolve_model(config.ppo.policy_model)
    elif is_exported(run / "sft" / "model"):
        policy = run / "sft" / "model"
    else:
        policy = resolve_model(config.model.name_or_path)
    policy = require_safetensors(policy).resolve()
    check_role(policy, "policy")
    check_tokenizer(policy)
    if not config.ppo.uses_reward_model:
        return ModelPaths(policy, None)
    reward = Path(config.ppo.reward_model) if config.ppo.reward_model else run / "rm" / "model"
    if not (reward / "config.json").is_file():
        raise FileNotFoundError(f"reward model not found at {reward}: run `rlhf-ray rm` first or set ppo.reward_model")
    reward = require_safetensors(reward).resolve()
    check_role(reward, "reward model")
    if config.ppo.normalize_reward and not (reward / "reward_stats.json").is_file():
        raise FileNotFoundError(
            f"{reward / 'reward_stats.json'} not found: ppo.normalize_reward needs the RM job's reward statistics "
            "(or set ppo.normalize_reward=false)"
        )
    return ModelPaths(policy, reward)


def model_identity(config: Config, paths: ModelPaths) -> dict:
    """What a checkpoint must match to be resumed: the starting policy's architecture and the LoRA shape."""
    return {
        "policy_model": str(paths.policy),
        "policy_config_sha256": sha256_of(paths.policy / "config.json"),
        "lora_r": config.lora.r,
        "lora_target_modules": sorted(config.lora.target_modules),
        "learner_backend": config.ppo.learner_backend,
        "advantage_estimator": config.ppo.advantage_estimator,
    }


# Identity keys a checkpoint's manifest may lack: such a checkpoint was written with these values.
IDENTITY_DEFAULTS = {"learner_backend": "torch", "advantage_estimator": "gae"}


def check_identity(checkpoint: Path, identity: dict) -> None:
    saved = read_manifest(checkpoint)
    saved = {**IDENTITY_DEFAULTS, **saved}
    different = [key for key in identity if key != "policy_model" and saved.get(key) != identity[key]]
    if different:
        raise CheckpointError(
            f"checkpoint {checkpoint} was written for another model or algorithm: {', '.join(different)} differ "
            f"(checkpoint: policy {saved.get('policy_model')}, LoRA r={saved.get('lora_r')}, "
            f"learner_backend {saved.get('learner_backend')}, advantage_estimator {saved.get('advantage_estimator')}; "
            f"this run: policy {identity['policy_model']}, LoRA r={identity['lora_r']}, "
            f"learner_backend {identity.get('learner_backend')}, "
            f"advantage_estimator {identity.get('advantage_estimator')})"
        )


def files_a_resume_reads(config: Config) -> tuple[str, ...]:
    """The files of a checkpoint folder that `PolicyLearner.load` and the driver read: its manifest must list them."""
    files = [DRIVER_STATE, "learner.json", "learner_state.pt", "adapter/adapter_config.json"]
    files.append("adapter/adapter_model.safetensors")
    if config.ppo.uses_critic:
        files.append("value_head.safetensors")
    if config.ppo.learner_backend == "deepspeed":
        files.append("deepspeed/learner/mp_rank_00_model_states.pt")
    return tuple(files)


def find_resume_checkpoint(folder: Path, identity: dict, required: tuple[str, ...] = ()) -> Path | None:
    """The newest complete checkpoint under `folder` (its manifest lists `required`); an error if there are
    checkpoints but none is usable."""
    candidates = sorted(folder.glob("iter_*")) if folder.is_dir() else []
    chosen = newest_valid(folder, "iter_*", log=lambda line: print(f"[ppo] {line}", flush=True), required=required)
    if chosen is None and candidates:
        raise CheckpointError(
            f"--resume: none of the {len(candidates)} checkpoints under {folder} is complete "
            "(see the warnings above); refusing to start over. Move the folder away to start afresh."
        )
    if chosen is None:
        print(f"[ppo] --resume: no checkpoint under {folder} yet; starting from iteration 0", flush=True)
        return None
    check_identity(chosen, identity)
    if chosen != candidates[-1]:
        print(f"[ppo] resuming from the previous complete checkpoint {chosen.name}", flush=True)
    return chosen


def _make_kl_controller(config: Config, value: float):
    ppo = config.ppo
    if ppo.adaptive_kl:
        return AdaptiveKLController(value, ppo.target_kl, ppo.kl_horizon)
    return FixedKLController(value)


def _write_samples(path: Path, iteration: int, rollouts, experience, prompts, tokenizer, limit: int = 4) -> None:
    with open(path, "a") as handle:
        for row, rollout in enumerate(rollouts[:limit]):
            handle.write(
                json.dumps(
                    {
                        "iteration": iteration,
                        "prompt": tokenizer.decode(prompts[rollout.prompt_index]),
                        "response": tokenizer.decode(rollout.token_ids, skip_special_tokens=True),
                        "score": float(experience.scores[row]),
                    }
                )
                + "\n"
            )


def run_ppo(config: Config, resume: bool = False, *, on_iteration=None) -> PPOResult:
    """Run PPO to `ppo.iterations`. `resume` continues from this run's newest complete checkpoint.
    `on_iteration(iteration, metrics, saved_checkpoint)` is called after every iteration (saved_checkpoint
    is None when none was written)."""
    out = (config.run.path / "ppo").resolve()
    require_writable(out)
    store = config.run.store
    if store is not None:  # the run so far (the SFT and RM models, checkpoints to resume)
        store.fetch("ppo")
    paths = resolve_model_paths(config)
    tokenizer = load_tokenizer(paths.policy, config.model.trust_remote_code)
    prompts = load_prompt_set(config, tokenizer)
    print(f"[ppo] prompts: {prompts.summary}", flush=True)
    rewards = " + ".join(f"{source.weight:g} x {source.label}" for source in config.ppo.rewards)
    print(f"[ppo] policy {paths.policy}; reward {rewards}" + (f" ({paths.reward})" if paths.reward else ""), flush=True)
    for source in config.ppo.rewards:  # a function that cannot be imported fails here, before any actor starts
        if source.kind == "function":
            load_function(function_name(source.function))
    identity = model_identity(config, paths)
    checkpoint = None
    if resume:
        checkpoint = find_resume_checkpoint(out / "checkpoints", identity, files_a_resume_reads(config))
    elif (out / "checkpoints").exists():
        raise FileExistsError(f"{out} already holds a PPO run; pass --resume to continue it or use another run.name")
    max_model_len = config.data.max_prompt_length + config.ppo.max_new_tokens
    specs = actor_specs(config, paths, tokenizer, max_model_len)
    print(f"[ppo] Ray: {ray_session.connect(config.resources)}; outputs in {out}", flush=True)
    ray_session.require_fits("ppo", role_requests(config))
    inputs = [path for path in (paths.policy, paths.reward, out / "checkpoints") if path is not None]
    ray_session.require_shared_output(config.run, out, inputs)
    save_config(config, out)
    if store is not None:
        store.push_paths(out / "config.yaml")
    crews: list[ActorCrew] = []

    def start_and_train() -> tuple[dict, dict]:
        crews.append(launch_actors(config, specs))
        if store is not None:  # an actor re-created on another node reads its models and checkpoints there
            crews[0].before_create = lambda: ray_session.pull_on_every_node(store, inputs)
        loop = PPOLoop(config, crews[0], prompts, tokenizer, out, identity, on_iteration)
        state, metrics = loop.run(checkpoint)
        loop.export_final(paths)
        return state, metrics

    try:
        state, metrics = ray_session.run_interruptibly(start_and_train)
    finally:
        for crew in crews:
            crew.stop()
    png = plot_curves(out / "metrics.jsonl", out / "curves.png", f"{config.run.name}: ppo", PLOTTED)
    if store is not None:
        store.push_paths(*(out / name for name in DRIVER_LOGS), *([png] if png else []))
    print(
        f"[ppo] done: model {out / 'model'}, adapter {out / 'adapter'}" + (f", curves {png}" if png else ""), flush=True
    )
    return PPOResult(out, state["iteration"], metrics)


class NonFiniteError(RuntimeError):
    """Too many updates in a row were skipped because of NaN/inf."""


class PPOLoop:
    """The iterations of one PPO run: collect, update, log, sample, checkpoint; and recovery.

    A dead generator, reward or reference actor is handled inside `ActorCrew`. A dead learner
    loses its weights, so the loop goes back to the last checkpoint (or the start) and replays:
    data order and sampling seeds depend only on the iteration number.
    """

    def __init__(self, config: Config, crew, prompts, tokenizer, out: Path, identity: dict, on_iteration=None):
        self.config, self.crew, self.prompts, self.tokenizer = config, crew, prompts, tokenizer
        self.out, self.identity, self.on_iteration = out, identity, on_iteration
        self.weights = GeneratorWeights(crew, config.ppo.weight_sync)
        self.source = (
            OverlappedRollouts(crew, self.batch_of, config.ppo.iterations)
            if config.ppo.overlap_generation
            else SyncRollouts(crew)
        )
        self.store = config.run.store
        self.last_checkpoint: Path | None = None
        self.log = None
        self.state: dict = {}
        self.metrics: dict = {}

    def run(self, checkpoint: Path | None) -> tuple[dict, dict]:
        from tqdm import tqdm

        self._start_from(checkpoint)
        iterations = self.config.ppo.iterations
        bar = tqdm(total=iterations, initial=self.state["iteration"], desc="ppo")
        while self.state["iteration"] < iterations:
            try:
                self._iterate()
            except RoleLost as lost:
                print(f"[ppo] {lost}; replaying from {self.last_checkpoint or 'the start'}", flush=True)
                self._start_from(self.last_checkpoint)
            bar.n = self.state["iteration"]
            bar.set_postfix(
                reward=f"{self.metrics.get('reward_mean', float('nan')):.3f}",
                kl=f"{self.metrics.get('kl', float('nan')):.3f}",
            )
            bar.refresh()
        bar.close()
        self.log.close()
        return self.state, self.metrics

    def _start_from(self, checkpoint: Path | None) -> None:
        """Learner, driver state and logs as of `checkpoint` (None: the beginning); generators get its weights."""
        while True:
            try:
                if checkpoint is not None:  # (from the start, the learner is fresh: just created or re-created)
                    self.crew.call("restore", LEARNER, LearnerRole.load, str(checkpoint))
                self.weights.push_from_learner()
                break
            except RoleLost as lost:
                print(f"[ppo] {lost}; trying again", flush=True)
        self.source.reset()  # sampled by weights that are gone; a resumed run samples its first batch again
        self.state = {
            "iteration": 0,
            "kl_coef": self.config.ppo.kl_coef,
            "samples_seen": 0,
            "skipped_updates": 0,
            "nonfinite_in_a_row": 0,
        }
        if checkpoint is not None:
            self.state.update(json.loads((checkpoint / DRIVER_STATE).read_text()))
            print(f"[ppo] resumed from {checkpoint} (iteration {self.state['iteration']})", flush=True)
        self.last_checkpoint = checkpoint
        self.kl_controller = _make_kl_controller(self.config, self.state["kl_coef"])
        trim_jsonl(self.out / "samples.jsonl", "iteration", self.state["iteration"])
        if self.log is not None:
            self.log.close()
        self.log = MetricsLog(self.out, resume_step=self.state["iteration"])

    def batch_of(self, iteration: int, sampling_round: int = 0) -> PromptBatch:
        """Prompts and sampling of `iteration` (and of its extra rounds of dynamic sampling): they depend on
        nothing else."""
        ppo, seed = self.config.ppo, self.config.run.seed
        ids = self.prompts.batch(iteration, ppo.rollout_batch_size, seed + EXTRA_ROUND_SEED * sampling_round)
        sampling = SamplingSpec(
            ppo.max_new_tokens,
            ppo.temperature,
            ppo.top_p,
            ppo.responses_per_prompt,
            seed=seed * 1_000 + iteration + EXTRA_ROUND_SEED * sampling_round,
        )
        rows = [self.prompts.row(i) for i in ids]
        return PromptBatch(iteration, ids, [self.prompts.token_ids[i] for i in ids], sampling, rows)

    def _iterate(self) -> None:
        ppo, state = self.config.ppo, self.state
        iteration = state["iteration"]
        batch = self.batch_of(iteration)
        result = ppo_step(
            self.crew,
            self.weights,
            self.source,
            batch,
            self.kl_controller.value,
            ppo,
            self.tokenizer.pad_token_id,
            more_prompts=lambda sampling_round: self.batch_of(iteration, sampling_round),
        )
        experience, rollouts, metrics = result.experience, result.rollouts, result.metrics()
        if result.sampled is not None:  # dynamic sampling: the prompts trained on come from several rounds
            batch = result.sampled.batch
        nonfinite = ", ".join(result.nonfinite_in) or "loss or gradients"
        if result.update_skipped:
            state["skipped_updates"] += 1
            state["nonfinite_in_a_row"] += 1
            print(
                f"[ppo] iteration {iteration + 1}: update skipped, NaN/inf in {nonfinite} "
                f"({state['nonfinite_in_a_row']} in a row)",
                flush=True,
            )
            if state["nonfinite_in_a_row"] >= ppo.max_nonfinite_in_a_row:
                raise NonFiniteError(
                    f"stopping at iteration {iteration + 1}: {state['nonfinite_in_a_row']} updates in a row "
                    f"were skipped for NaN/inf (ppo.max_nonfinite_in_a_row={ppo.max_nonfinite_in_a_row}); last in "
                    f"{nonfinite}; prompt ids of that batch: {batch.prompt_ids}"
                )
        else:
            state["nonfinite_in_a_row"] = 0
            self.kl_controller.update(result.mean_kl, len(rollouts))
        if experience.values is not None:
            metrics["explained_variance"] = float(
                explained_variance(experience.values, experience.returns, experience.batch.response_mask)
            )
        state.update(
            {
                "iteration": iteration + 1,
                "kl_coef": self.kl_controller.value,
                "prompt_ids": batch.prompt_ids,
                "samples_seen": state["samples_seen"] + len(rollouts),
            }
        )
        metrics.update(
            samples_seen=state["samples_seen"],
            skipped_updates=state["skipped_updates"],
            actor_restarts=self.crew.total_restarts,
        )  # restarts by this driver process
        self.metrics = metrics = finite_only(metrics)
        self.log.log(iteration + 1, metrics)
        dashboard_metrics.publish(metrics, self.config.run.name, "ppo")
        if ppo.sample_every and (iteration + 1) % ppo.sample_every == 0:
            _write_samples(
                self.out / "samples.jsonl", iteration + 1, rollouts, experience, batch.prompts, self.tokenizer
            )
        saved = None
        if ppo.checkpoint_every and (iteration + 1) % ppo.checkpoint_every == 0 or iteration + 1 == ppo.iterations:
            saved = self._save_checkpoint()
        if self.on_iteration is not None:
            self.on_iteration(iteration + 1, metrics, saved)

    def _save_checkpoint(self) -> Path:
        """Learner state and driver state into a staging folder, manifest last, renamed into place."""
        folder = self.out / "checkpoints"
        target = folder / f"iter_{self.state['iteration']:06d}"
        staging = folder / f".tmp-{target.name}"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir(parents=True)
        self.crew.call("checkpoint", LEARNER, LearnerRole.save, str(staging))
        self._from_learner("checkpoint", staging)
        (staging / DRIVER_STATE).write_text(json.dumps(self.state, indent=2) + "\n")
        write_manifest(staging, {"iteration": self.state["iteration"], **self.identity})
        commit(staging, target)
        prune(folder, "iter_*", CHECKPOINTS_KEPT)
        if self.store is not None:  # the new checkpoint (manifest last), pruned ones deleted, the logs so far
            self.store.push(self.store.relative(folder), delete_missing=True)
            self.store.delete(self.store.relative(staging))
            self._in_learner("checkpoint", _drop_local, str(staging))  # (the learner's node may be another)
            self.store.push_paths(*(self.out / name for name in DRIVER_LOGS))
        self.last_checkpoint = target
        return target

    def _in_learner(self, phase: str, function, *args) -> None:
        """With an object-store run folder: `function(store, *args)` in the learner's process, on its node."""
        if self.store is not None:
            self.crew.run_inside(phase, LEARNER, function, self.store, *args)

    def _from_learner(self, phase: str, written: Path) -> None:
        """With an object-store run folder: the files the learner wrote to `written` on its node reach the store
        and this driver's working copy (where a learner on this node left them already)."""
        if self.store is not None:
            self._in_learner(phase, _send_files, str(written), str(written))
            self.store.pull_paths(written)

    def export_final(self, paths: ModelPaths) -> None:
        """The merged model and the adapter, each renamed into place; `export.json` in the model last."""
        staging = self.out / ".export-tmp"
        while True:
            shutil.rmtree(staging, ignore_errors=True)
            try:
                self.crew.call("export", LEARNER, LearnerRole.export_merged, str(staging), str(paths.policy))
                for name in ("model", "adapter"):  # (with an object-store run folder) into the store
                    self._in_learner("export", _send_files, str(staging / name), str(self.out / name))
                break
            except RoleLost as lost:  # the last iteration always checkpoints, so restoring loses nothing
                print(f"[ppo] {lost}; restoring {self.last_checkpoint} to export", flush=True)
                self.crew.call("restore", LEARNER, LearnerRole.load, str(self.last_checkpoint))
        for name in ("model", "adapter"):
            if self.store is None or (staging / name).exists():  # (else the learner's node is another)
                shutil.rmtree(self.out / name, ignore_errors=True)
                os.replace(staging / name, self.out / name)
            if self.store is not None:
                self.store.pull_paths(self.out / name)
        shutil.rmtree(staging, ignore_errors=True)
        self._in_learner("export", _drop_local, str(staging))
        summary = {
            "stage": "ppo",
            "lora": True,
            "base_model": str(paths.policy),
            "reward_model": str(paths.reward) if paths.reward else None,
            "rewards": [source.label for source in self.config.ppo.rewards],
            "advantage_estimator": self.config.ppo.advantage_estimator,
        }
        mark_exported(self.out / "model", summary)
        if self.store is not None:
            self.store.push_paths(self.out / "model")


def _send_files(_learner, store: RunStore, written: str, into: str) -> int:
    """(In the learner's process.) `written` of this node's working copy to `into` in the store, replacing it."""
    return store.send(store.relative(written), store.relative(into), delete_missing=True)


def _drop_local(_learner, store: RunStore, folder: str) -> None:
    """(In the learner's process.) A staging folder the driver has committed from the store, gone from this node."""
    shutil.rmtree(folder, ignore_errors=True)
