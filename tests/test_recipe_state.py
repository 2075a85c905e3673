"""The page's one recipe (ui/recipe_state.py), below the page: the widget edits its part of the
recipe and nothing else; removing the last blended slice takes the blend's method, base and
parameters with it."""

import yaml

from merger.recipe.mergekit_yaml import recipe_from_dict, recipe_from_yaml
from ui import recipe_state

A, B = "org/a", "org/b"
COLUMNS = [{"ref": A, "label": "a", "num_layers": 8}, {"ref": B, "label": "b", "num_layers": 8}]
LINEAR = f"""
slices:
- sources:
  - {{model: {A}, layer_range: [0, 4]}}
- sources:
  - {{model: {A}, layer_range: [4, 8], parameters: {{weight: 0.3}}}}
  - {{model: {B}, layer_range: [4, 8], parameters: {{weight: 0.7}}}}
merge_method: linear
base_model: {A}
parameters: {{normalize: false}}
dtype: bfloat16
tokenizer_source: {A}
chat_template: chatml
"""


def test_removing_the_last_blended_source_resets_method_base_and_their_parameters():
    state = recipe_state.of_recipe(recipe_from_yaml(LINEAR), COLUMNS)
    value = yaml.safe_load(yaml.safe_dump(state["widget"]))
    del value["slices"][1]["blend"]  # stack.js: the second model taken out of the blend
    after, redraw = recipe_state.widget_edited(state, value)
    recipe = recipe_from_dict(after["recipe"])
    assert recipe.merge_method == "passthrough" and recipe.base_model is None and recipe.parameters == {}
    assert [s.source.parameters for s in recipe.slices] == [{}, {}]  # linear's weight would make mergekit refuse
    assert (recipe.dtype, recipe.tokenizer_source, recipe.preserved) == ("bfloat16", A, {"chat_template": "chatml"})
    assert redraw and "merge_method" not in after["widget"] and "base_model" not in after["widget"]
    assert yaml.safe_load(recipe.to_yaml())["merge_method"] == "passthrough"


def test_a_blend_left_in_the_stack_keeps_its_method():
    state = recipe_state.of_recipe(recipe_from_yaml(LINEAR), COLUMNS)
    value = yaml.safe_load(yaml.safe_dump(state["widget"]))
    value["slices"][0]["repeat"] = 2
    after, redraw = recipe_state.widget_edited(state, value)
    recipe = recipe_from_dict(after["recipe"])
    assert not redraw and recipe.merge_method == "linear" and recipe.base_model == A
    assert recipe.num_layers == 12 and recipe.parameters == {"normalize": False}


def test_the_widget_redrawn_from_the_recipe_is_no_edit():
    state = recipe_state.of_recipe(recipe_from_yaml(LINEAR), COLUMNS)
    assert recipe_state.widget_edited(state, state["widget"]) is None
    assert recipe_state.widget_edited(state, {**state["widget"], "seam_scores": {"1": 0.3}}) is None
