"""The layer-stack widget in a real browser: sweep-select, add, repeat, duplicate, reorder, remove, seams,
Python-side updates and escaping of user-supplied model names.

Runs a tiny Gradio app in-process and drives the system Chromium with Playwright (never `playwright install`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import gradio as gr
import pytest

from merger.methods.specs import BLEND_METHODS
from merger.recipe import MAX_REPEAT
from ui.stack import merged_layer_count, seam_positions, stack_widget

from browserkit import free_port, sweep, wait_for

XSS = "<img src=x onerror=alert(1)>"
SMOL = "bundled:smollm2-135m-instruct"
QWEN = "hf:Qwen/Qwen2.5-0.5B-Instruct"
EVIL = "local:evil"
# "stacking": which columns blend with which (made in Python, merger.plan.stacking_key); the evil model's
# layers have another shape
MODELS = [
    {"ref": SMOL, "label": "SmolLM2-135M-Instruct", "num_layers": 30, "stacking": "one-shape"},
    {"ref": QWEN, "label": "Qwen2.5-0.5B-Instruct", "num_layers": 24, "stacking": "one-shape"},
    {"ref": EVIL, "label": f"Evil {XSS} model", "num_layers": 12, "stacking": "another-shape"},
]
PRESET = {
    "models": MODELS,
    "slices": [
        {"model": SMOL, "start": 0, "end": 20, "repeat": 1},
        {"model": EVIL, "start": 4, "end": 8, "repeat": 2},
        {"model": SMOL, "start": 10, "end": 30, "repeat": 1},
    ],
    "seam_scores": {"1": {"measured": 0.31, "predicted": 0.25}, "1-rep-1": 0.12, "2": 0.87},
}


@pytest.fixture(scope="module")
def app() -> Iterator[tuple[str, list[dict]]]:
    """A demo page: the widget, a gr.JSON mirror fed by .change, and a button that sets the value from Python."""
    received: list[dict] = []

    def mirror(value: dict) -> dict:
        received.append(value)
        return value

    with gr.Blocks() as demo:
        widget = stack_widget({"models": MODELS, "slices": []}, elem_id="stack")
        preset = gr.Button("Load preset", elem_id="preset")
        shown = gr.JSON(label="value seen by Python", elem_id="mirror")
        widget.change(mirror, widget, shown)
        preset.click(lambda: PRESET, None, widget)

    port = free_port()
    demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=port, quiet=True)
    try:
        yield f"http://127.0.0.1:{port}/", received
    finally:
        demo.close()


def last_value(received: list[dict], predicate: Callable[[dict], bool], what: str) -> dict:
    """The latest value Python received through .change, once it satisfies `predicate`."""
    return wait_for(lambda: received and predicate(received[-1]) and received[-1], what)


def merged_layers(page) -> int:
    return int(page.get_by_test_id("merged-layers").inner_text())


def drawn_seams(page) -> list[int]:
    """Slice indices with a seam drawn before them (not the repeat seams inside a block)."""
    ids = page.locator(".fs-seam-join").evaluate_all("els => els.map(e => e.dataset.testid)")
    return [int(i.removeprefix("seam-")) for i in ids]


def slice_tuples(value: dict) -> list[tuple]:
    return [(s["model"], s["start"], s["end"], s["repeat"]) for s in value["slices"]]


def test_stack_widget_edits_reach_python_draw_seams_and_escape_model_names(app, page) -> None:
    url, received = app
    page.goto(url)
    page.get_by_test_id("cell-0-0").wait_for()
    assert page.get_by_test_id("stack-add-0").is_disabled()
    assert merged_layers(page) == 0

    # 1. sweep layers 2..5 of the first column, then add them: Python gets [2, 6)
    sweep(page, 0, 2, 5)
    selected = page.locator("[data-testid^='cell-0-'].sel").evaluate_all("els => els.map(e => e.dataset.layer)")
    assert selected == ["2", "3", "4", "5"]
    page.get_by_test_id("stack-add-0").click()
    v = last_value(received, lambda v: len(v["slices"]) == 1, "the first slice")
    assert v["slices"] == [{"model": SMOL, "start": 2, "end": 6, "repeat": 1}]
    assert v["models"] == MODELS
    assert "layers 2–5 (4)" in page.get_by_test_id("slice-0").inner_text()
    assert merged_layers(page) == 4
    page.locator("#mirror").get_by_text('"end"').first.wait_for()  # the gr.JSON mirror shows it too

    # 2. repeat 3: three passes, two repeat seams inside the block, 12 merged layers
    page.get_by_test_id("slice-repeat-0").fill("3")
    page.get_by_test_id("slice-repeat-0").press("Enter")
    v = last_value(received, lambda v: v["slices"][0]["repeat"] == 3, "repeat 3")
    assert merged_layers(page) == merged_layer_count(v) == 12
    assert page.locator("[data-testid^='seam-0-rep-']").count() == 2

    # 3. a slice that continues [2, 6) seamlessly, then one from another model (a seam), duplicated
    sweep(page, 0, 6, 9)
    page.get_by_test_id("stack-add-0").click()
    sweep(page, 1, 0, 3)
    page.get_by_test_id("stack-add-1").click()
    last_value(received, lambda v: len(v["slices"]) == 3, "three slices")
    page.get_by_test_id("slice-dup-2").click()
    v = last_value(received, lambda v: len(v["slices"]) == 4, "the duplicate")
    assert slice_tuples(v) == [(SMOL, 2, 6, 3), (SMOL, 6, 10, 1), (QWEN, 0, 4, 1), (QWEN, 0, 4, 1)]
    assert drawn_seams(page) == seam_positions(v) == [2, 3]
    assert merged_layers(page) == merged_layer_count(v) == 24

    # 4. drag the first Qwen block onto the top half of block 0: it moves to the front
    target = page.get_by_test_id("slice-0")
    page.get_by_test_id("slice-2").drag_to(target, target_position={"x": 60, "y": 4})
    v = last_value(received, lambda v: v["slices"][0]["model"] == QWEN, "the reorder")
    assert slice_tuples(v) == [(QWEN, 0, 4, 1), (SMOL, 2, 6, 3), (SMOL, 6, 10, 1), (QWEN, 0, 4, 1)]
    assert drawn_seams(page) == seam_positions(v) == [1, 3]

    # 5. remove the repeated block
    page.get_by_test_id("slice-remove-1").click()
    v = last_value(received, lambda v: len(v["slices"]) == 3, "the removal")
    assert slice_tuples(v) == [(QWEN, 0, 4, 1), (SMOL, 6, 10, 1), (QWEN, 0, 4, 1)]
    assert drawn_seams(page) == seam_positions(v) == [1, 2]
    assert merged_layers(page) == merged_layer_count(v) == 12

    # 6. Python sets a new value: the widget redraws, colours scored seams and keeps working
    page.locator("#preset").click()
    page.get_by_test_id("slice-2").get_by_text("layers 10–29 (20)").wait_for()
    assert merged_layers(page) == merged_layer_count(PRESET) == 48
    assert drawn_seams(page) == seam_positions(PRESET) == [1, 2]
    seam = page.get_by_test_id("seam-1")
    assert "0.31" in seam.inner_text()
    assert "measured 0.310, predicted 0.250" in seam.get_attribute("title")
    assert "--seam:hsl(27" in seam.get_attribute("style")  # 0.31 of the 0.4 that is full red: orange
    assert "0.87" in page.get_by_test_id("seam-2").inner_text()
    assert "--seam:hsl(0," in page.get_by_test_id("seam-2").get_attribute("style")
    assert page.locator("[data-testid^='seam-1-rep-']").count() == 1
    assert "0.12" in page.get_by_test_id("seam-1-rep-1").inner_text()
    page.get_by_test_id("slice-remove-1").click()
    v = last_value(received, lambda v: len(v["slices"]) == 2, "a removal after the redraw")
    assert v["seam_scores"] is None  # scores belong to the stack they were measured on
    assert page.locator("[data-testid^='score-']").count() == 0
    assert seam_positions(v) == drawn_seams(page) == [1]
    page.locator("#preset").click()
    page.get_by_test_id("slice-2").wait_for()

    # 7. a model name with markup shows as text, in the column header and in the stack
    evil_col = page.get_by_test_id("stack-col-2")
    assert XSS in evil_col.inner_text()
    assert XSS in page.get_by_test_id("slice-1").inner_text()
    assert page.locator("#stack img").count() == 0

    page.get_by_test_id("cell-1-0").scroll_into_view_if_needed()
    sweep(page, 1, 8, 15)  # leave a live selection in the screenshot
    page.locator("#stack").screenshot(path="/tmp/stack.png")


def recipe_from_value(value: dict):
    from merger.recipe.mergekit_yaml import recipe_from_dict
    from ui.recipe_value import stack_mapping

    return recipe_from_dict(stack_mapping(value))


def one_slice(app, page, first: int, last: int) -> list[dict]:
    """A fresh page whose stack is SmolLM2's layers first..last (inclusive); the values Python receives."""
    url, received = app
    page.goto(url)
    page.get_by_test_id("cell-0-0").wait_for()
    sweep(page, 0, first, last)
    page.get_by_test_id("stack-add-0").click()
    last_value(received, lambda v: len(v["slices"]) == 1 and "blend" not in v["slices"][0], "a plain slice")
    return received


def test_a_blended_slice_is_built_and_edited_in_one_block(app, page) -> None:
    received = one_slice(app, page, 0, 3)

    # 0. "+ blend" offers only the columns whose layers have this slice's shapes
    offered = page.get_by_test_id("slice-blend-0").locator("option").evaluate_all("els => els.map(e => e.value)")
    assert offered == ["", QWEN]

    # 1. blend it with the same layers of the second model: one block, both sources, weights 1 and 1
    page.get_by_test_id("slice-blend-0").select_option(QWEN)
    v = last_value(received, lambda v: v["slices"][0].get("blend"), "the blend")
    assert v["merge_method"] == "linear"
    assert v["slices"][0]["blend"] == [{"model": QWEN, "start": 0, "end": 4, "parameters": {"weight": 1}}]
    block = page.get_by_test_id("slice-0")
    assert "Blend · linear" in block.inner_text()
    assert "SmolLM2-135M-Instruct" in page.get_by_test_id("source-0-0").inner_text()
    assert "Qwen2.5-0.5B-Instruct" in page.get_by_test_id("source-0-1").inner_text()
    assert page.locator(".fs-slice").count() == 1 and merged_layers(page) == 4

    # 2. edit a weight: the recipe blends 1 : 0.25
    page.get_by_test_id("source-weight-0-1").fill("0.25")
    page.get_by_test_id("source-weight-0-1").press("Enter")
    v = last_value(received, lambda v: v["slices"][0]["blend"][0]["parameters"]["weight"] == 0.25, "weight 0.25")
    recipe = recipe_from_value(v)
    (blended,) = recipe.slices
    assert [(s.model, s.start, s.end, s.parameters["weight"]) for s in blended.sources] == [
        (SMOL, 0, 4, 1),
        (QWEN, 0, 4, 0.25),
    ]
    assert recipe.merge_method == "linear"
    page.locator("#stack").screenshot(path="/tmp/stack-blend.png")

    # 3. switch to slerp: the base is the first model, one t per slice replaces the weights
    page.get_by_test_id("blend-method").select_option("slerp")
    v = last_value(received, lambda v: v.get("merge_method") == "slerp", "slerp")
    assert v["base_model"] == SMOL and v["slices"][0]["slice_parameters"] == {"t": 0.5}
    page.get_by_test_id("slice-t-0").fill("0.3")
    page.get_by_test_id("slice-t-0").press("Enter")
    v = last_value(received, lambda v: v["slices"][0]["slice_parameters"]["t"] == 0.3, "t 0.3")
    recipe = recipe_from_value(v)
    assert recipe.base_model == SMOL and recipe.slices[0].parameters == {"t": 0.3}
    assert all("weight" not in s.parameters for s in recipe.slices[0].sources)

    # 4. take the second model out: a plain slice again
    page.get_by_test_id("source-remove-0-1").click()
    v = last_value(received, lambda v: "blend" not in v["slices"][0], "the unblend")
    assert (v["slices"][0]["model"], v["slices"][0]["start"], v["slices"][0]["end"]) == (SMOL, 0, 4)
    assert "layers 0–3 (4)" in page.get_by_test_id("slice-0").inner_text()


def test_the_blend_menu_offers_every_method_and_fits_the_block_to_each(app, page) -> None:
    received = one_slice(app, page, 2, 5)
    page.get_by_test_id("slice-blend-0").select_option(QWEN)
    last_value(received, lambda v: v["slices"][0].get("blend"), "the blend")

    def pick(method: str) -> dict:
        page.get_by_test_id("blend-method").select_option(method)
        return last_value(received, lambda v: v.get("merge_method") == method, method)

    # della: a base (the first model, shown as such) and a weight for the other
    v = pick("della")
    recipe = recipe_from_value(v)
    assert recipe.base_model == SMOL and recipe.slices[0].sources[1].parameters == {"weight": 1}
    assert page.get_by_test_id("source-0-0").inner_text().strip().endswith("base")
    assert page.get_by_test_id("source-weight-0-1").count() == 1
    # nearswap: one t per slice (a distance, starting small), no weights
    v = pick("nearswap")
    recipe = recipe_from_value(v)
    assert recipe.slices[0].parameters == {"t": 0.001}
    assert all("weight" not in s.parameters for s in recipe.slices[0].sources)
    assert page.get_by_test_id("source-weight-0-1").count() == 0
    # slerp's t means a position: it starts again at 0.5
    assert recipe_from_value(pick("slerp")).slices[0].parameters == {"t": 0.5}
    # model_stock takes neither
    v = pick("model_stock")
    assert "slice_parameters" not in v["slices"][0] and page.get_by_test_id("slice-t-0").count() == 0
    # nuslerp may go without a base: "none" blends the two models themselves, each with a weight
    pick("nuslerp")
    assert page.get_by_test_id("blend-base").locator("option").first.inner_text() == "none"
    page.get_by_test_id("blend-base").select_option("")
    v = last_value(received, lambda v: v.get("merge_method") == "nuslerp" and not v.get("base_model"), "no base")
    recipe = recipe_from_value(v)
    assert recipe.base_model is None and [s.parameters for s in recipe.slices[0].sources] == [{"weight": 1}] * 2
    # karcher ignores a base: no base picker
    v = pick("karcher")
    assert recipe_from_value(v).merge_method == "karcher" and page.get_by_test_id("blend-base").count() == 0


def test_the_widget_takes_its_methods_and_repeat_limit_from_python(app, page) -> None:
    """The repeat box goes up to the recipe's own limit and the blend menu lists merger.methods.specs'
    methods: the widget is handed them (props), it does not keep copies that drift apart."""
    received = one_slice(app, page, 0, 1)
    repeat = page.get_by_test_id("slice-repeat-0")
    assert repeat.get_attribute("max") == str(MAX_REPEAT)
    repeat.fill(str(MAX_REPEAT))
    repeat.press("Enter")
    v = last_value(received, lambda v: v["slices"][0]["repeat"] != 1, "the repeat")
    assert v["slices"][0]["repeat"] == MAX_REPEAT

    page.get_by_test_id("slice-blend-0").select_option(QWEN)
    last_value(received, lambda v: v["slices"][0].get("blend"), "the blend")
    drawn = page.get_by_test_id("blend-method").locator("option").evaluate_all("els => els.map(e => e.value)")
    assert drawn == list(BLEND_METHODS)
