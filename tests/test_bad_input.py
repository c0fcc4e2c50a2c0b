"""Bad input end to end: malformed data files, configs and command lines through the real `rlhf-ray` entry point.

Each case writes a config based on configs/tiny.yaml (plus small data files) into tmp_path, runs
`rlhf_ray.cli.main` in-process and requires:

  (a) exit code 2 (our own errors and argparse's),
  (b) a message on stderr that says what is wrong and where (data: file, line and field),
  (c) no Python traceback,
  (d) nothing written under `run.output_dir`, and Ray never started: every input is checked first.
"""

from __future__ import annotations

import gzip
import json
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml

from rlhf_ray.cli import main
from rlhf_ray.typed_yaml import yaml_key_lines

REPO = Path(__file__).resolve().parents[1]

SFT_ROW = {"prompt": "Name a fruit.", "completion": "An apple."}
PAIR_ROW = {"prompt": "Name a fruit.", "chosen": "An apple.", "rejected": "A chair."}
PROMPT_ROW = {"prompt": "Name a fruit."}
LONG_TEXT = "Tell me about the weather, the market and the train to the city. " * 8  # far over 40 tokens


def jsonl(*rows) -> str:
    """Rows are dicts (dumped as JSON) or raw strings (written as they are), one per line."""
    return "".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows)


def gz(text: str) -> bytes:
    return gzip.compress(text.encode())


# Valid data written for every case; a case replaces the file it breaks. Eight prompts give 6 train,
# 1 eval and 1 test row in the split by prompt (seed 0): enough for one optimizer step of the tiny
# config (2 x 2 workers).
def numbered(row: dict, n: int = 8) -> list[dict]:
    return [{**row, "prompt": f"Name fruit number {i}."} for i in range(n)]


GOOD_FILES = {
    "data/sft.jsonl": jsonl(*numbered(SFT_ROW)),
    "data/pairs.jsonl": jsonl(*numbered(PAIR_ROW)),
    "data/prompts.jsonl": jsonl(*numbered(PROMPT_ROW)),
}


def copy_model_without_safetensors(tmp: Path, model_dir: Path) -> None:
    shutil.copytree(model_dir, tmp / "bin-model", ignore=shutil.ignore_patterns("*.safetensors"))
    (tmp / "bin-model" / "pytorch_model.bin").write_bytes(b"pickled weights would go here")


def copy_model(tmp: Path, model_dir: Path, name: str, change: Callable[[Path], None]) -> None:
    shutil.copytree(model_dir, tmp / name)
    change(tmp / name)


def truncate_weights(folder: Path) -> None:
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-100])


def set_architecture(name: str) -> Callable[[Path], None]:
    def change(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, "architectures": [name]}))

    return change


AS_REWARD_MODEL = set_architecture("LlamaForSequenceClassification")  # (no reward_stats.json)


def drop_tokenizer(folder: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt", "special_tokens_map.json"):
        (folder / name).unlink(missing_ok=True)


@dataclass(frozen=True)
class Case:
    id: str
    argv: list[str]  # "{config}" and "{tmp}" are filled in
    expect: list[str]  # substrings stderr must contain ("{tmp}" filled in)
    config: dict = field(default_factory=dict)  # dotted key -> value set in the case's config (None = null)
    config_text: str | None = None  # the config file's whole text instead of the tiny config
    config_line_of: str | None = None  # stderr must also name "config.yaml:<line of this dotted key>"
    files: dict = field(default_factory=dict)  # path under tmp -> text, bytes, or None for an empty folder
    setup: Callable[[Path, Path], None] | None = None  # (tmp, tiny model folder) -> None
    model: bool = True  # needs the tiny model (component tier)


CASES = [
    # ---- data files ----
    Case(
        "sft-bad-json-at-line-3",
        ["sft", "{config}"],
        ["sft.jsonl:3: field '<json>'", "not valid JSON"],
        files={"data/sft.jsonl": jsonl(SFT_ROW, SFT_ROW, '{"prompt": "Hi", "completion": }', SFT_ROW)},
    ),
    Case(
        "rm-row-is-a-list-not-an-object",
        ["rm", "{config}"],
        ["pairs.jsonl:2: field '<json>'", "expected a JSON object, got list"],
        files={"data/pairs.jsonl": jsonl(PAIR_ROW, '["Name a fruit.", "An apple."]', PAIR_ROW)},
    ),
    Case(
        "rm-wrong-keys",
        ["rm", "{config}"],
        ["pairs.jsonl:3: field 'prompt': missing (row has keys: bad, good, question)"],
        files={"data/pairs.jsonl": jsonl(PAIR_ROW, PAIR_ROW, {"question": "x", "good": "y", "bad": "z"})},
    ),
    Case(
        "rm-chosen-is-a-number",
        ["rm", "{config}"],
        ["pairs.jsonl:2: field 'chosen'", "got int"],
        files={"data/pairs.jsonl": jsonl(PAIR_ROW, {**PAIR_ROW, "chosen": 5})},
    ),
    Case(
        "sft-completion-is-null",
        ["sft", "{config}"],
        ["sft.jsonl:4: field 'completion'", "got NoneType"],
        files={"data/sft.jsonl": jsonl(SFT_ROW, SFT_ROW, SFT_ROW, {**SFT_ROW, "completion": None})},
    ),
    Case(
        "sft-line-not-utf8",
        ["sft", "{config}"],
        ["sft.jsonl:2: field '<text>': not UTF-8 (byte 0xff"],
        files={"data/sft.jsonl": jsonl(SFT_ROW).encode() + b'{"prompt": "\xff\xfe"}\n'},
    ),
    Case(
        "sft-empty-data-file",
        ["sft", "{config}"],
        ["sft.jsonl: no valid sft rows (0 read; it holds no rows)"],
        files={"data/sft.jsonl": ""},
    ),
    Case(
        "sft-corrupt-gzip",
        ["sft", "{config}", "data.sft.path={tmp}/data/sft.jsonl.gz"],
        ["sft.jsonl.gz:1: not a readable gzip file", "Not a gzipped file"],
        files={"data/sft.jsonl.gz": b"this was never gzipped\n"},
    ),
    Case(
        "data-inspect-truncated-gzip",
        ["data", "inspect", "{tmp}/data/cut.jsonl.gz", "--tokenizer", "{model}"],
        ["cut.jsonl.gz:", "not a readable gzip file", "ended before the end-of-stream marker"],
        files={"data/cut.jsonl.gz": gz(jsonl(*[PAIR_ROW] * 50))[:60]},
    ),
    Case(
        "data-inspect-missing-file",
        ["data", "inspect", "{tmp}/data/nope.jsonl", "--tokenizer", "{model}"],
        ["nope.jsonl: no such file or folder"],
    ),
    Case(
        "data-inspect-csv-file",
        ["data", "inspect", "{tmp}/data/pairs.csv", "--tokenizer", "{model}"],
        ["pairs.csv: unsupported file type; expected one of .jsonl, .jsonl.gz"],
        files={"data/pairs.csv": "prompt,chosen,rejected\n"},
    ),
    Case(
        "data-inspect-every-row-bad",
        ["data", "inspect", "{tmp}/data/junk.jsonl", "--tokenizer", "{model}"],
        ["junk.jsonl: no valid prompts rows (2 read", "not valid JSON", "junk.jsonl:1", "junk.jsonl:2"],
        files={"data/junk.jsonl": "oops\n{{\n"},
    ),
    Case(
        "data-inspect-missing-tokenizer",
        ["data", "inspect", "{tmp}/data/pairs.jsonl", "--tokenizer", "/nonexistent-tok"],
        ["'/nonexistent-tok' is neither a model folder nor a known model name"],
        model=False,
    ),
    Case(
        "ppo-prompts-path-missing",
        ["ppo", "{config}", "data.prompts.path={tmp}/data/missing.jsonl"],
        ["missing.jsonl: no such file or folder"],
    ),
    Case(
        "rm-folder-without-jsonl",
        ["rm", "{config}", "data.preference.path={tmp}/data/folder"],
        ["folder: holds no .jsonl or .jsonl.gz files"],
        files={"data/folder": None, "data/folder/notes.txt": "not data"},
    ),
    Case(
        "sft-prompt-over-max-length-overlong-error",
        ["sft", "{config}", "data.overlong=error"],
        ["sft.jsonl:2: field '<length>'", "tokens > max_length 64", "data.overlong"],
        files={"data/sft.jsonl": jsonl(SFT_ROW, {"prompt": LONG_TEXT, "completion": "Sunny."})},
    ),
    Case(
        "sft-4-mb-line-overlong-error-refused-before-tokenizing",
        ["sft", "{config}", "data.overlong=error"],
        ["sft.jsonl:2: field '<length>'", "4000006 characters, more than 64 tokens can hold", "data.max_length"],
        files={"data/sft.jsonl": jsonl(SFT_ROW, {"prompt": "word " * 800_000, "completion": "Sunny."})},
    ),
    Case(
        "ppo-prompt-over-budget-overlong-error",
        ["ppo", "{config}", "data.overlong=error"],
        ["prompts.jsonl:3: field '<length>'", "tokens > max_prompt_length 40", "data.max_prompt_length"],
        files={"data/prompts.jsonl": jsonl(PROMPT_ROW, PROMPT_ROW, {"prompt": LONG_TEXT})},
    ),
    Case(
        "sft-too-few-rows-for-one-step",
        ["sft", "{config}"],
        [
            "sft: 2 training rows are fewer than one optimizer step needs",
            "sft.batch_size 2 x sft.grad_accum 1 x resources.num_workers 2 = 4",
        ],
        files={"data/sft.jsonl": jsonl(*numbered(SFT_ROW, 4))},
    ),  # 2 train, 1 eval, 1 test
    Case(
        "pipeline-bad-prompt-row-caught-before-sft",
        ["pipeline", "{config}"],
        ["prompts.jsonl:2: field 'prompt'", "must not end with an assistant message"],
        files={"data/prompts.jsonl": jsonl(PROMPT_ROW, {"prompt": [{"role": "assistant", "content": "Hi"}]})},
    ),
    Case(
        "pipeline-sft-row-missing-completion",
        ["pipeline", "{config}"],
        ["sft.jsonl:2: field 'completion': missing (row has keys: prompt, response)"],
        files={"data/sft.jsonl": jsonl(SFT_ROW, {"prompt": "Hi", "response": "Hello"})},
    ),
    Case(
        "pipeline-identical-pair-caught-before-sft",
        ["pipeline", "{config}"],
        ["pairs.jsonl:3: field 'rejected': identical to 'chosen'"],
        files={"data/pairs.jsonl": jsonl(PAIR_ROW, PAIR_ROW, {**PAIR_ROW, "rejected": "An apple."})},
    ),
    # ---- models ----
    Case(
        "sft-model-folder-missing",
        ["sft", "{config}"],
        ["'/nonexistent' is neither a model folder nor a known model name"],
        config={"model.name_or_path": "/nonexistent"},
    ),
    Case(
        "rm-model-folder-without-config-json",
        ["rm", "{config}", "model.name_or_path={tmp}/data"],
        ["data has no config.json"],
    ),
    Case(
        "sft-model-with-pickled-weights-only",
        ["sft", "{config}", "model.name_or_path={tmp}/bin-model"],
        ["bin-model has no .safetensors weights (['pytorch_model.bin'])"],
        setup=copy_model_without_safetensors,
    ),
    Case(
        "sft-model-weights-truncated",
        ["sft", "{config}", "model.name_or_path={tmp}/cut-model"],
        ["cut-model/model.safetensors cannot be loaded:", "(truncated or padded)"],
        setup=lambda tmp, model: copy_model(tmp, model, "cut-model", truncate_weights),
    ),
    Case(
        "ppo-policy-weights-truncated",
        ["ppo", "{config}", "ppo.policy_model={tmp}/cut-model"],
        ["cut-model/model.safetensors cannot be loaded:"],
        setup=lambda tmp, model: copy_model(tmp, model, "cut-model", truncate_weights),
    ),
    Case(
        "rm-model-config-not-json",
        ["rm", "{config}", "model.name_or_path={tmp}/bad-config"],
        ["bad-config/config.json: not a valid JSON config"],
        setup=lambda tmp, model: copy_model(
            tmp, model, "bad-config", lambda folder: (folder / "config.json").write_text("{not json")
        ),
    ),
    Case(
        "sft-model-without-tokenizer",
        ["sft", "{config}", "model.name_or_path={tmp}/no-tokenizer"],
        ["no-tokenizer has no tokenizer files", "set model.tokenizer"],
        setup=lambda tmp, model: copy_model(tmp, model, "no-tokenizer", drop_tokenizer),
    ),
    Case(
        "ppo-policy-is-a-reward-model",
        ["ppo", "{config}", "ppo.policy_model={tmp}/scorer"],
        ["scorer holds a LlamaForSequenceClassification, but the policy must be a ...ForCausalLM"],
        setup=lambda tmp, model: copy_model(tmp, model, "scorer", AS_REWARD_MODEL),
    ),
    Case(
        "ppo-reward-model-is-a-causal-lm",
        ["ppo", "{config}", "ppo.reward_model={model}"],
        ["holds a LlamaForCausalLM, but the reward model must be a ...ForSequenceClassification"],
    ),
    Case(
        "ppo-reward-model-without-reward-stats",
        ["ppo", "{config}", "ppo.reward_model={tmp}/rm-no-stats"],
        ["rm-no-stats/reward_stats.json not found", "or set ppo.normalize_reward=false"],
        setup=lambda tmp, model: copy_model(tmp, model, "rm-no-stats", AS_REWARD_MODEL),
    ),
    Case(
        "ppo-reward-model-missing",
        ["ppo", "{config}", "ppo.reward_model=null"],
        ["reward model not found at {tmp}/runs/tiny/rm/model", "run `rlhf-ray rm` first"],
    ),
    Case(
        "pipeline-reward-model-folder-missing",
        ["pipeline", "{config}", "ppo.reward_model={tmp}/no-rm"],
        ["no-rm is not a model folder (no config.json)"],
    ),
    Case(
        "pipeline-judge-reward-model-missing",
        ["pipeline", "{config}", "eval.extra_reward_models=[{tmp}/no-judge]"],
        ["eval.extra_reward_models:", "no-judge' is neither a model folder nor a known model name"],
    ),
    Case(
        "eval-policy-folder-missing",
        ["eval", "policy", "{config}", "--policy", "{tmp}/no-policy", "--reward-model", "{model}"],
        ["no-policy' is neither a model folder nor a known model name"],
    ),
    Case(
        "eval-policy-bad-prompt-row",
        [
            "eval",
            "policy",
            "{config}",
            "--policy",
            "{model}",
            "--reward-model",
            "{model}",
            "--data",
            "{tmp}/data/prompts.jsonl",
        ],
        ["prompts.jsonl:2: field 'prompt'"],
        files={"data/prompts.jsonl": jsonl(PROMPT_ROW, {"prompt": [{"role": "assistant", "content": "Hi"}]})},
    ),
    Case(
        "eval-rm-data-missing",
        ["eval", "rm", "{config}", "--model", "{model}", "--data", "{tmp}/none.jsonl"],
        ["none.jsonl: no such file or folder"],
    ),
    # ---- config values ----
    Case(
        "sft-data-format-xml",
        ["sft", "{config}"],
        ["'data.sft.format' must be one of", "got 'xml'"],
        config={"data.sft.format": "xml"},
        config_line_of="data.sft.format",
        model=False,
    ),
    Case(
        "config-show-format-of-wrong-kind",
        ["config", "show", "{config}"],
        [
            "invalid 'data': preference.format 'prompt-completion' cannot be read as preference data",
            "['auto', 'hh-rlhf', 'pairs']",
        ],
        config={"data.preference.format": "prompt-completion"},
        config_line_of="data.preference",
        model=False,
    ),
    Case(
        "sft-batch-size-zero",
        ["sft", "{config}", "sft.batch_size=0"],
        ["command-line override 'sft.batch_size=0'", "batch_size must be > 0, got 0"],
        model=False,
    ),
    Case(
        "ppo-rollout-batch-size-negative",
        ["ppo", "{config}", "ppo.rollout_batch_size=-1"],
        ["command-line override 'ppo.rollout_batch_size=-1'", "rollout_batch_size must be > 0, got -1"],
        model=False,
    ),
    Case(
        "config-show-prompt-budget-not-below-max-length",
        ["config", "show", "{config}"],
        ["max_prompt_length must be > 0 and < max_length (64)", "got 64"],
        config={"data.max_prompt_length": 64},
        config_line_of="data.max_prompt_length",
        model=False,
    ),
    Case(
        "pipeline-unknown-key-did-you-mean",
        ["pipeline", "{config}"],
        ["unknown key 'ppo.kl_coeff' (did you mean 'ppo.kl_coef'?)"],
        config={"ppo.kl_coeff": 0.1},
        config_line_of="ppo.kl_coeff",
        model=False,
    ),
    Case(
        "ppo-lr-not-a-number",
        ["ppo", "{config}", "ppo.lr=abc"],
        ["command-line override 'ppo.lr=abc'", "'ppo.lr' must be float, got str 'abc'"],
        model=False,
    ),
    Case(
        "rm-on-bad-row-typo",
        ["rm", "{config}"],
        ["'data.on_bad_row' must be one of ['error', 'skip'], got 'ignore'"],
        config={"data.on_bad_row": "ignore"},
        config_line_of="data.on_bad_row",
        model=False,
    ),
    Case(
        "sft-run-name-with-slash",
        ["sft", "{config}", "run.name=a/b"],
        ["name must be a non-empty folder name, got 'a/b'"],
        model=False,
    ),
    Case(
        "sft-deepspeed-json-missing",
        ["sft", "{config}", "deepspeed.config_file={tmp}/nope.json"],
        ["DeepSpeed config not found: {tmp}/nope.json (deepspeed.config_file)"],
    ),
    Case(
        "sft-output-dir-under-a-file",
        ["sft", "{config}", "run.output_dir={tmp}/a-file/runs"],
        ["{tmp}/a-file is a file, not a folder (run.output_dir)"],
        files={"a-file": "not a folder"},
    ),
    Case(
        "ppo-output-dir-under-a-file",
        ["ppo", "{config}", "run.output_dir={tmp}/a-file/runs"],
        ["{tmp}/a-file is a file, not a folder (run.output_dir)"],
        files={"a-file": "not a folder"},
    ),
    # ---- config files ----
    Case(
        "sft-bad-yaml-syntax",
        ["sft", "{config}"],
        ["config.yaml:4: not valid YAML", "(while parsing a flow sequence, from line 4)"],
        config_text="run:\n  name: tiny\nppo:\n  kl_coef: [0.1\n",
        model=False,
    ),
    Case(
        "rm-yaml-tab-indent",
        ["rm", "{config}"],
        ["config.yaml:3: not valid YAML", "found character '\\t'"],
        config_text="run:\n  name: tiny\n\tseed: 1\n",
        model=False,
    ),
    Case(
        "config-show-duplicate-key",
        ["config", "show", "{config}"],
        ["config.yaml:3: duplicate key 'ppo.lr' (first given at line 2)"],
        config_text="ppo:\n  lr: 1.0e-5\n  lr: 1.0e-3\n",
        model=False,
    ),
    Case(
        "rm-config-file-missing",
        ["rm", "{tmp}/missing.yaml"],
        ["config file not found: {tmp}/missing.yaml"],
        model=False,
    ),
    Case(
        "config-show-top-level-is-a-list",
        ["config", "show", "{config}"],
        ["config.yaml: the top level must be a mapping of sections, got list"],
        config_text="- run\n- ppo\n",
        model=False,
    ),
    Case(
        "config-show-section-is-a-number",
        ["config", "show", "{config}", "ppo=3"],
        ["'ppo' must be a mapping, got int 3"],
        model=False,
    ),
    Case(
        "ppo-config-not-utf8",
        ["ppo", "{config}"],
        ["config.yaml: not a YAML text file (not UTF-8: byte 0xff"],
        config_text=b"run:\n  name: \xff\xfe\n",
        model=False,
    ),
    # ---- command line ----
    Case(
        "unknown-subcommand",
        ["train", "{config}"],
        ["rlhf-ray: error: argument COMMAND: invalid choice: 'train'"],
        model=False,
    ),
    Case(
        "sft-missing-config-argument",
        ["sft"],
        ["rlhf-ray sft: error: the following arguments are required: file\n"],
        model=False,
    ),
    Case(
        "sft-unknown-option",
        ["sft", "{config}", "--resume"],
        ["rlhf-ray: error: unrecognized arguments: --resume"],
        model=False,
    ),
    Case(
        "data-inspect-unknown-format",
        ["data", "inspect", "{tmp}/data/pairs.jsonl", "--format", "xml"],
        ["argument --format: invalid choice: 'xml'"],
        model=False,
    ),
    Case(
        "sft-override-without-equals",
        ["sft", "{config}", "sft.batch_size"],
        ["override 'sft.batch_size' must look like key.path=value"],
        model=False,
    ),
]


# Cases that only a running cluster can tell: they pass every check made before Ray starts, so they run
# against the suite's real local Ray (2 CPUs, no GPU) and must still fail in seconds, in one line, with
# nothing written under run.output_dir.
THROUGH_RAY = [
    Case(
        "sft-workers-larger-than-any-node",
        ["sft", "{config}"],
        ["sft: sft worker 1 of 1 needs CPU 4 (resources.cpus_per_worker), and no node of the cluster can hold it"],
        config={"resources.num_workers": 1, "resources.cpus_per_worker": 4},
    ),
    Case(
        "rm-workers-that-fit-one-at-a-time-but-not-together",
        ["rm", "{config}"],
        ["rm: rm worker 2 of 2 needs CPU 1.5", "beside the other roles placed first", "CPU 2 in all, CPU 1.5 taken"],
        config={"resources.cpus_per_worker": 1.5},
    ),
    Case(
        "ppo-learner-on-a-gpu-the-cluster-lacks",
        ["ppo", "{config}"],
        ["ppo: the policy-learner actor needs CPU 0.5, GPU 1 (resources.actor_num_cpus, resources.learner_num_gpus)"],
        config={"resources.learner_num_gpus": 1},
    ),
    Case(
        "eval-policy-generator-on-a-gpu-the-cluster-lacks",
        ["eval", "policy", "{config}", "--policy", "{model}", "--reward-model", "{reward}"],
        ["eval policy: the eval generator actor needs CPU 0.5, GPU 1 (resources.actor_num_cpus, "],
        config={"resources.generator_num_gpus": 1},
    ),
]

# A Python stack frame as tracebacks and Ray's remote errors print it (Ray's do not say "Traceback").
STACK_FRAME = re.compile(r'File "[^"]+", line \d+|line \d+, in ')


def write_case_files(case: Case, tmp: Path, model_dir: Path | None, reward_dir: Path | None) -> Path:
    for relative, content in {**GOOD_FILES, **case.files}.items():
        path = tmp / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        if content is None:
            path.mkdir(exist_ok=True)
        elif isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content)
    if case.setup is not None:
        case.setup(tmp, model_dir)
    config_path = tmp / "config.yaml"
    if case.config_text is not None:
        text = case.config_text
        config_path.write_bytes(text) if isinstance(text, bytes) else config_path.write_text(text)
        return config_path
    config = yaml.safe_load((REPO / "configs" / "tiny.yaml").read_text())
    settings = {
        "run.output_dir": str(tmp / "runs"),
        "model.name_or_path": str(model_dir or tmp / "no-model-needed"),
        "ppo.reward_model": str(reward_dir) if reward_dir else None,
        "deepspeed.config_file": str(REPO / "configs" / "deepspeed" / "zero2.json"),
        "data.sft": {"path": str(tmp / "data" / "sft.jsonl"), "format": "prompt-completion"},
        "data.preference": {"path": str(tmp / "data" / "pairs.jsonl"), "format": "pairs"},
        "data.prompts": {"path": str(tmp / "data" / "prompts.jsonl"), "format": "prompts"},
        **case.config,
    }
    for dotted, value in settings.items():
        *sections, key = dotted.split(".")
        node = config
        for section in sections:
            node = node.setdefault(section, {})
        node[key] = value
    config_path.write_text(yaml.safe_dump(config, sort_keys=False))
    return config_path


def run_cli(argv: list[str], capsys) -> tuple[int, str]:
    """`rlhf-ray ARGV` in-process: (exit code, stderr). Anything but a clean exit fails the test."""
    try:
        code = main(argv)
    except SystemExit as exit_:  # argparse
        code = exit_.code
    except Exception as err:  # noqa: BLE001 - anything else is what the user would see as a traceback
        pytest.fail(f"rlhf-ray {' '.join(argv)} raised {type(err).__name__}: {err}")
    return code, capsys.readouterr().err


def _ray_must_not_start(resources):
    raise AssertionError("Ray was started: the bad input was not caught before the run began")


def route_transformers_logs_here(monkeypatch) -> None:
    """transformers' log handler keeps the sys.stderr it was made with (perhaps an earlier test's
    capsys stream, closed since); point it at this test's, so its warnings are captured and checked too."""
    import logging

    from transformers.utils import logging as hf_logging

    hf_logging.get_logger("transformers")  # makes the handler if nothing has yet
    for handler in logging.getLogger("transformers").handlers:
        if type(handler) is logging.StreamHandler:  # not pytest's own capture handlers
            monkeypatch.setattr(handler, "stream", sys.stderr)


@pytest.mark.parametrize(
    "case",
    [pytest.param(case, id=case.id, marks=pytest.mark.component if case.model else pytest.mark.unit) for case in CASES],
)
def test_bad_input_fails_cleanly(case: Case, tmp_path, monkeypatch, request):
    model_dir = request.getfixturevalue("tiny_model_dir") if case.model else None
    reward_dir = (
        request.getfixturevalue("tiny_reward_dir") if case.model and case.argv[0] in ("ppo", "pipeline") else None
    )
    capsys = request.getfixturevalue("capsys")  # after the model fixtures, so their output is not in stderr
    if case.model:
        route_transformers_logs_here(monkeypatch)
    monkeypatch.setattr("rlhf_ray.ray_session.connect", _ray_must_not_start)
    config_path = write_case_files(case, tmp_path, model_dir, reward_dir)

    def fill(text: str) -> str:
        return (
            text.replace("{config}", str(config_path))
            .replace("{tmp}", str(tmp_path))
            .replace("{model}", str(model_dir))
        )

    code, err = run_cli([fill(arg) for arg in case.argv], capsys)

    assert code == 2, f"exit code {code}, stderr:\n{err}"
    for expected in case.expect:
        assert fill(expected) in err, f"expected {fill(expected)!r} in stderr:\n{err}"
    if case.config_line_of:
        line = yaml_key_lines(config_path.read_text())[case.config_line_of]
        assert f"{config_path}:{line}: " in err, f"expected {config_path}:{line} in stderr:\n{err}"
    assert_one_clean_error(err, tmp_path / "runs")


def assert_one_clean_error(err: str, runs: Path) -> None:
    assert "Traceback" not in err and not STACK_FRAME.search(err), f"stack frames in stderr:\n{err}"
    assert "error:" in err
    assert not runs.exists(), f"the failed run wrote {sorted(str(p.relative_to(runs)) for p in runs.rglob('*'))}"


@pytest.mark.component
@pytest.mark.parametrize("command", ["sft", "ppo", "pipeline"])
def test_a_read_only_output_folder_fails_in_one_line_before_anything_starts(command, tmp_path, monkeypatch, request):
    """(The tests run as root, whom permission bits do not stop, so the file system's answer is stood in for.)"""
    model_dir, reward_dir = request.getfixturevalue("tiny_model_dir"), request.getfixturevalue("tiny_reward_dir")
    capsys = request.getfixturevalue("capsys")
    route_transformers_logs_here(monkeypatch)
    monkeypatch.setattr("rlhf_ray.ray_session.connect", _ray_must_not_start)
    config_path = write_case_files(Case("read-only", [command], []), tmp_path, model_dir, reward_dir)
    monkeypatch.setattr("rlhf_ray.config.os.access", lambda path, mode: Path(path) != tmp_path)
    code, err = run_cli([command, str(config_path)], capsys)
    assert code == 2, err
    assert f"output folder {tmp_path / 'runs'}" in err and f"{tmp_path} cannot be written (read-only" in err
    assert_one_clean_error(err, tmp_path / "runs")


@pytest.mark.ray
@pytest.mark.parametrize("case", THROUGH_RAY, ids=[case.id for case in THROUGH_RAY])
def test_bad_input_that_reaches_ray_fails_fast_and_cleanly(case: Case, ray_local, tmp_path, request):
    model_dir, reward_dir = request.getfixturevalue("tiny_model_dir"), request.getfixturevalue("tiny_reward_dir")
    capsys = request.getfixturevalue("capsys")
    config_path = write_case_files(case, tmp_path, model_dir, reward_dir)
    began = time.monotonic()
    places = {"{config}": config_path, "{model}": model_dir, "{reward}": reward_dir, "{tmp}": tmp_path}
    argv = [places.get(arg, arg) for arg in case.argv]
    code, err = run_cli([str(arg) for arg in argv], capsys)
    assert code == 2, f"exit code {code}, stderr:\n{err}"
    assert time.monotonic() - began < 60, "the check should fail before any worker or actor starts"
    for expected in case.expect:
        assert expected in err, f"expected {expected!r} in stderr:\n{err}"
    assert_one_clean_error(err, tmp_path / "runs")


@pytest.mark.unit
def test_the_table_is_broad():
    """At least 50 malformed inputs, each with its own name, across these subcommands, some through a real Ray."""
    assert len(CASES) + len(THROUGH_RAY) >= 50 and len({case.id for case in CASES}) == len(CASES)
    assert THROUGH_RAY
    commands = {" ".join(case.argv[:2]) if case.argv[0] in ("data", "config") else case.argv[0] for case in CASES}
    assert {"sft", "rm", "ppo", "pipeline", "eval", "data inspect", "config show"} <= commands


@pytest.mark.component
def test_a_damaged_sft_checkpoint_is_refused_before_ray_starts_and_nothing_is_written(tmp_path, monkeypatch, request):
    """A run folder whose only checkpoint (registered with Ray Train) has a manifest that is not an object: SFT
    names the checkpoint and the problem and refuses to start over, before Ray starts, touching nothing."""
    model_dir = request.getfixturevalue("tiny_model_dir")
    capsys = request.getfixturevalue("capsys")
    route_transformers_logs_here(monkeypatch)
    monkeypatch.setattr("rlhf_ray.ray_session.connect", _ray_must_not_start)
    config_path = write_case_files(Case("damaged-checkpoint", ["sft"], []), tmp_path, model_dir, None)
    checkpoints = tmp_path / "runs" / "tiny" / "sft" / "ray" / "sft"
    damaged = checkpoints / "checkpoint_2026-01-01_00-00-00.000000"
    damaged.mkdir(parents=True)
    for rank in range(2):
        (damaged / f"manifest_rank{rank}.json").write_text("[]")
    snapshot = {"checkpoint_results": [{"checkpoint_dir_name": damaged.name, "metrics": {"step": 2}}]}
    (checkpoints / "checkpoint_manager_snapshot.json").write_text(json.dumps(snapshot))
    before = {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("*")}
    code = main(["sft", str(config_path), "resources.num_workers=2"])
    out, err = capsys.readouterr()
    assert code == 2, err
    assert f"skipping checkpoint {damaged}: manifest_rank0.json is not a JSON object" in out, out
    assert f"no complete checkpoint under {checkpoints}" in err and "refusing to start over" in err, err
    assert "Traceback" not in err and not STACK_FRAME.search(err), err
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "runs").rglob("*")} == before
