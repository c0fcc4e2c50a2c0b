import re
from pathlib import Path

import pytest
from pydantic import BaseModel

from rlhf_ray import typed_yaml
from rlhf_ray.config import Config, ConfigError, load_config, save_config

pytestmark = pytest.mark.unit


def write(tmp_path, text, name="c.yaml"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_defaults_are_valid():
    config = load_config(None)
    assert config.ppo.kl_coef == 0.05 and config.model.trust_remote_code is False


def test_file_and_dotted_overrides(tmp_path):
    path = write(tmp_path, "ppo:\n  kl_coef: 0.2\n  iterations: 3\nlora:\n  r: 8\n")
    config = load_config(path, ["ppo.kl_coef=0.05", "lora.target_modules=[q_proj]", "model.tokenizer=null"])
    assert config.ppo.kl_coef == 0.05  # override wins over the file
    assert config.ppo.iterations == 3  # file wins over the default
    assert config.lora.r == 8 and config.lora.target_modules == ["q_proj"]
    assert config.model.tokenizer is None


def test_int_and_exponent_strings_accepted_for_float(tmp_path):
    assert load_config(write(tmp_path, "ppo:\n  kl_coef: 1\n")).ppo.kl_coef == 1.0
    assert load_config(write(tmp_path, "ppo:\n  lr: 1e-5\n")).ppo.lr == 1e-5  # YAML 1.1 reads this as a string
    assert load_config(None, ["sft.lr=3E-4"]).sft.lr == 3e-4
    with pytest.raises(ConfigError, match="'ppo.lr' must be float, got str 'fast'"):
        load_config(None, ["ppo.lr=fast"])


def test_unknown_key_names_key_file_and_line(tmp_path):
    path = write(tmp_path, "run:\n  name: x\nppo:\n  iterations: 2\n  kl_coeff: 0.1\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert f"{path}:5" in message and "'ppo.kl_coeff'" in message and "did you mean 'ppo.kl_coef'" in message


def test_unknown_section(tmp_path):
    with pytest.raises(ConfigError, match=r"c\.yaml:1: unknown key 'pop'"):
        load_config(write(tmp_path, "pop:\n  kl_coef: 0.1\n"))


@pytest.mark.parametrize(
    "text, pattern",
    [
        ("ppo:\n  iterations: ten\n", r"c\.yaml:2: 'ppo\.iterations' must be int, got str 'ten'"),
        ("ppo:\n  iterations: 2.5\n", r"'ppo\.iterations' must be int, got float"),
        ("model:\n  trust_remote_code: 1\n", r"'model\.trust_remote_code' must be bool, got int"),
        ("lora:\n  target_modules: q_proj\n", r"'lora\.target_modules' must be a list"),
        ("data:\n  overlong: cut\n", r"'data\.overlong' must be one of \['error', 'skip', 'truncate_prompt'\]"),
        ("ppo: 3\n", r"'ppo' must be a mapping"),
        ("- a\n- b\n", r"top level must be a mapping"),
        ("ppo:\n  kl_coef: [1\n", r"not valid YAML"),
    ],
)
def test_wrong_types(tmp_path, text, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(write(tmp_path, text))


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("sft.batch_size=0", r"override 'sft\.batch_size=0'.*batch_size must be > 0"),
        ("ppo.minibatch_size=64", r"minibatch_size must be <= rollout_batch_size"),
        ("ppo.kl_coef", r"must look like key\.path=value"),
        ("ppo.kl_coef.x=1", r"override 'ppo\.kl_coef\.x=1'.*'ppo\.kl_coef' must be float"),
        ("data.eval_fraction=1.5", r"eval_fraction must be in \[0, 1\)"),
    ],
)
def test_validation_errors_name_the_override(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, [override])


def test_merged_weight_sync_refuses_adapters_on_the_embeddings():
    with pytest.raises(ConfigError, match=r"weight_sync=merged .* \['lm_head'\].*use ppo.weight_sync=adapter"):
        load_config(None, ["lora.target_modules=[q_proj, lm_head]"])
    assert load_config(None, ["lora.target_modules=[q_proj, lm_head]", "ppo.weight_sync=adapter"]).lora.target_modules


@pytest.mark.parametrize(
    "overrides, pattern",
    [
        (
            ["ppo.advantage_estimator=grpo"],
            r"advantage_estimator grpo compares .*responses_per_prompt must be >= 2, got 1",
        ),
        (["ppo.advantage_estimator=ppo"], r"'ppo\.advantage_estimator' must be one of \['gae', 'grpo'"),
        (
            ["ppo.responses_per_prompt=2", "ppo.dynamic_sampling=true", "ppo.overlap_generation=true"],
            r"dynamic_sampling .* needs responses_per_prompt >= 2 and overlap_generation false",
        ),
        (["ppo.rewards=[{kind: http}]"], r"invalid 'ppo\.rewards\[0\]': a reward source of kind http needs `url`"),
        (
            ["ppo.rewards=[{kind: function, function: nocolon}]"],
            r"function 'nocolon': expected 'package\.module:function'",
        ),
        (["ppo.rewards=[{kind: http, url: 'ftp://x'}]"], r"url 'ftp://x': expected http:// or https://"),
        (["ppo.rewards=[{kind: model}, {kind: model}]"], r"at most one source of kind model"),
        (
            ["ppo.rewards=[{kind: model}, {kind: function, functoin: x}]"],
            r"unknown key 'ppo\.rewards\[1\]\.functoin' \(did you mean 'ppo\.rewards\[1\]\.function'\?\)",
        ),
        (["ppo.clip_range_low=1.5"], r"clip_range_low must be in \(0, 1\), got 1\.5"),
    ],
)
def test_estimator_and_reward_settings_are_checked(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_config(None, overrides)


def test_reward_sources_and_critic_follow_the_settings():
    ppo = load_config(None, ["ppo.advantage_estimator=rloo", "ppo.responses_per_prompt=2"]).ppo
    assert not ppo.uses_critic and ppo.uses_reward_model  # the default source is the trained RM
    ppo = load_config(None, ['ppo.rewards=[{kind: function, function: "a.b:c", weight: 2}]']).ppo
    assert ppo.uses_critic and not ppo.uses_reward_model and ppo.rewards[0].label == "function a.b:c"


def test_missing_file():
    with pytest.raises(ConfigError, match="config file not found: nope.yaml"):
        load_config("nope.yaml")


def test_round_trip_through_yaml(tmp_path):
    config = load_config(None, ["ppo.kl_coef=0.3", "sweep.lrs=[1.0e-6, 2.0e-6]", "run.name=rt"])
    saved = save_config(config, tmp_path / "run")
    assert saved.name == "config.yaml"
    again = load_config(saved)
    assert again == config
    assert typed_yaml.dump(again) == saved.read_text()


def test_shipped_configs_load():
    from pathlib import Path

    configs = sorted((Path(__file__).parents[1] / "configs").glob("*.yaml"))
    assert configs, "no configs shipped"
    for path in configs:
        assert isinstance(load_config(path), Config), path


@pytest.mark.parametrize(
    "override, pattern",
    [
        ("sft.lr=.inf", r"lr must be a finite number, got inf"),
        ("ppo.max_grad_norm=.nan", r"max_grad_norm must be a finite number, got nan"),
        ("ppo.temperature=.inf", r"temperature must be a finite number"),
        ("ppo.reward_clip=-1", r"reward_clip must be > 0, got -1"),
        ("sft.weight_decay=-5", r"weight_decay must be >= 0, got -5"),
        ("ppo.vllm_kv_cache_gib=-1", r"vllm_kv_cache_gib must be > 0, got -1"),
        ("sweep.lrs=[1e-5, x]", r"'sweep\.lrs\[1\]' must be float, got str 'x'"),
        ("lora.target_modules=[]", r"target_modules must not be empty"),
    ],
)
def test_non_finite_and_out_of_range_numbers_are_refused(override, pattern):
    with pytest.raises(ConfigError, match=rf"override '{re.escape(override)}'.*{pattern}"):
        load_config(None, [override])


def test_an_empty_section_means_its_defaults_and_sections_do_not_share_defaults(tmp_path):
    config = load_config(write(tmp_path, "ppo:\nrun:\n  name: x\n"))
    assert config.ppo == Config().ppo and config.run.name == "x"
    config.data.sft.path = "elsewhere.jsonl"
    assert Config().data.sft.path == "data/demo/sft.jsonl"


def sections(model):
    for name, info in type(model).model_fields.items():
        value = getattr(model, name)
        yield type(model).__name__, name, info
        if isinstance(value, BaseModel):
            yield from sections(value)


def test_every_setting_has_a_description():
    missing = [f"{owner}.{name}" for owner, name, info in sections(Config()) if not info.description]
    assert not missing


def test_described_config_loads_back_the_same_and_says_what_each_setting_does(tmp_path):
    config = load_config(None, ["ppo.kl_coef=0.3", "sweep.lrs=[1.0e-6, 2.0e-6]", "model.tokenizer=null"])
    text = typed_yaml.dump_described(config)
    assert load_config(write(tmp_path, text)) == config
    assert "  kl_coef: 0.3  # weight of the per-token KL penalty to the reference policy\n" in text
    assert all("  # " in line for line in text.splitlines())


def test_the_committed_configuration_reference_is_current():
    from rlhf_ray.config_reference import reference_markdown

    committed = Path(__file__).parents[1] / "docs" / "configuration.md"
    assert committed.read_text() == reference_markdown(), (
        "docs/configuration.md is stale: run `rlhf-ray config docs --out docs/configuration.md`"
    )


def test_the_reference_lists_every_setting_with_its_type_bounds_and_default():
    from rlhf_ray.config_reference import reference_markdown

    text = reference_markdown()
    for owner, name, _ in sections(Config()):  # a setting is a row, a section a heading
        assert f"{name}` |" in text or f"{name}`: " in text, f"{owner}.{name}"
    assert "| `ppo.kl_coef` | float (>= 0) | `0.05` | weight of the per-token KL penalty" in text
    assert "| `data.prompts.path` | str | `data/demo/prompts.jsonl` |" in text  # the parent section's default
    assert "| `ppo.rewards[].url` | str or null | `null` |" in text
