"""Recipe loading, overrides and errors that name the file, the key and the fix."""

from __future__ import annotations

import pytest

from hf_tokplug.errors import RecipeError
from hf_tokplug.recipe import apply_overrides, dump_resolved, load_recipe


def test_overrides_set_delete_and_keep_types(recipe_file):
    recipe = load_recipe(recipe_file(), ["train.learning_rate=1e-2", "train.max_steps=7", "~data.max_samples",
                                         "adapter.r=4", "model.dtype=bfloat16"])
    assert recipe.train["learning_rate"] == 0.01 and recipe.train["max_steps"] == 7
    assert recipe.data.max_samples is None
    assert recipe.adapter.r == 4 and recipe.model.dtype == "bfloat16"


def test_yaml_1e4_is_a_float(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("task: causal_lm_sft\nmodel: {name_or_path: toy://llama}\ntrain: {learning_rate: 1e-4}\n")
    assert load_recipe(path).train["learning_rate"] == 1e-4


def test_unknown_key_suggests(recipe_file):
    with pytest.raises(RecipeError) as err:
        load_recipe(recipe_file(), ["model.nmae_or_path=x"])
    text = str(err.value)
    assert "recipe.yaml (with command-line overrides): model.nmae_or_path" in text
    assert "did you mean 'name_or_path'" in text and "fix:" in text


def test_wrong_type_names_key(recipe_file):
    with pytest.raises(RecipeError, match="adapter.r") as err:
        load_recipe(recipe_file(), ["adapter.r=many"])
    assert "integer" in str(err.value)


def test_delete_missing_key(recipe_file):
    with pytest.raises(RecipeError, match="cannot delete 'nothing.here'"):
        load_recipe(recipe_file(), ["~nothing.here"])


def test_bad_override_syntax(recipe_file):
    with pytest.raises(RecipeError, match="key.path=value"):
        load_recipe(recipe_file(), ["train.max_steps"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("task: [unclosed\n")
    with pytest.raises(RecipeError, match="line 2"):
        load_recipe(bad)


def test_resolved_dump_includes_plugin_defaults(recipe_file):
    recipe = load_recipe(recipe_file(plugins={"zloss": None}))
    text = dump_resolved(recipe, {"zloss": {"weight": 0.0001, "chunk_size": 1024}})
    assert "weight: 0.0001" in text and "output_dir:" in text


def test_apply_overrides_does_not_mutate():
    data = {"a": {"b": 1}}
    assert apply_overrides(data, ["a.b=2", "a.c.d=x"]) == {"a": {"b": 2, "c": {"d": "x"}}}
    assert data == {"a": {"b": 1}}


def test_yaml_12_booleans_keep_no_a_string(recipe_file):
    recipe = load_recipe(recipe_file(), ["train.eval_strategy=no", "train.save_strategy=no", "overwrite=true"])
    assert recipe.train["eval_strategy"] == "no" and recipe.train["save_strategy"] == "no" and recipe.overwrite is True
