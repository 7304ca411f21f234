"""Config validation: defaults of the published trainer, errors that name the key."""

import pytest

from orwcfm_fast.config import DEFAULTS, OPTIONS, ConfigError, serializable_config, validate_config

REFERENCE_DEFAULTS = {
    "learning_rate": 2e-4,
    "warmup_steps": 5000,
    "w2_coefficient": 1.0,
    "temperature": 0.5,
    "grad_clip": 1.0,
    "batch_size": 128,
}


def test_reference_keys_and_defaults():
    cfg = validate_config({})
    for key, value in REFERENCE_DEFAULTS.items():
        assert cfg[key] == value
    for key in ("text_prompts", "use_wandb", "wandb_project", "run_name", "savedir", "ref_path", "parallel"):
        assert key in cfg
    assert set(cfg) == set(OPTIONS) == set(DEFAULTS)


def test_new_keys_defaults():
    cfg = validate_config(None)
    assert cfg["reward"] == "clip"
    assert cfg["ode_solver"] == "euler" and cfg["ode_steps"] == 100
    assert cfg["coupling"] == "independent"
    assert cfg["weight_normalization"] is None  # resolved by the trainer: see test_weighting_coupling's defaults test
    assert cfg["guidance_scale"] is None and cfg["cfg_mode"] == "guided"
    assert cfg["clip_model"] == "ViT-B-32"
    assert cfg["sample_shape"] is None and cfg["seed"] is None


@pytest.mark.parametrize(
    "typo, suggestion",
    [("learning_rat", "learning_rate"), ("w2_coef", "w2_coefficient"), ("temprature", "temperature"),
     ("ode_solvr", "ode_solver"), ("coupeling", "coupling")],
)
def test_unknown_key_names_closest(typo, suggestion):
    with pytest.raises(ConfigError) as err:
        validate_config({typo: 1})
    assert repr(typo) in str(err.value) and repr(suggestion) in str(err.value)


@pytest.mark.parametrize(
    "key, value",
    [("learning_rate", -1e-4), ("learning_rate", 0.0), ("learning_rate", "fast"), ("w2_coefficient", -1.0),
     ("temperature", -0.5), ("temperature", float("nan")), ("batch_size", 0), ("batch_size", 2.5),
     ("batch_size", True), ("warmup_steps", -1), ("grad_clip", 0.0), ("ode_steps", 0),
     ("ode_solver", "eular"), ("coupling", "ot"), ("weight_normalization", "softmax"),
     ("use_wandb", "yes"), ("text_prompts", "a dog"), ("text_prompts", []), ("sample_shape", (3, 0, 8)),
     ("sample_shape", "3x8x8"), ("reward", 3), ("seed", -1), ("clip_pretrained", 5)],
)
def test_invalid_values_name_the_key(key, value):
    with pytest.raises(ConfigError) as err:
        validate_config({key: value})
    assert repr(key) in str(err.value)


def test_did_you_mean_for_choice_values():
    with pytest.raises(ConfigError, match="did you mean 'euler'"):
        validate_config({"ode_solver": "eular"})


def test_normalisation():
    cfg = validate_config({"learning_rate": 1, "sample_shape": [3, 8, 8], "grad_clip": None, "text_prompts": ("a", "b")})
    assert isinstance(cfg["learning_rate"], float)
    assert cfg["sample_shape"] == (3, 8, 8)
    assert cfg["grad_clip"] is None
    assert cfg["text_prompts"] == ["a", "b"]
    assert validate_config({"sample_shape": 2})["sample_shape"] == (2,)


def test_callables_accepted_and_serialised():
    def my_reward(x):
        return x.sum(1)

    cfg = validate_config({"reward": my_reward, "coupling": lambda x0, x1, w, generator=None: (x0, x1, w)})
    out = serializable_config(cfg)
    assert out["reward"] == "<callable test_callables_accepted_and_serialised.<locals>.my_reward>"
    assert out["coupling"].startswith("<callable")
    assert out["learning_rate"] == cfg["learning_rate"]


def test_not_a_mapping():
    with pytest.raises(ConfigError, match="dict"):
        validate_config([("learning_rate", 1e-4)])


def test_readme_config_table_lists_every_key():
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    missing = [key for key in OPTIONS if f"| `{key}`" not in readme]
    assert not missing, f"README's config table lacks {missing}"
