"""Every failure is a sentence: the inputs that used to end in a traceback (CLI) or a bare "Error"
(web) each get one plain line on stderr with exit code 2, or a sentence on the page."""

import json
import re
import shutil
import struct
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest

import app
from merger.__main__ import main
from merger.recipe import passthrough
from merger.sources.catalog import LocalPolicy
from ui.recipe_state import empty_state

from markdown_text import shown

LONG_PART = "a" * 300  # a name part over the 255 bytes a file system takes
VISITOR = SimpleNamespace(session_hash="bad-inputs-visitor", query_params={})
SETTINGS = tuple(app.DEFAULT_SETTINGS.values())  # the share link's settings, the edit handlers' last inputs


def edit_tensor(**changes):
    """Damage one tensor's entry in the folder's real safetensors header, keeping every byte of data."""

    def edit(folder: Path) -> None:
        raw = (folder / "model.safetensors").read_bytes()
        (length,) = struct.unpack("<Q", raw[:8])
        header = json.loads(raw[8 : 8 + length])
        name = next(n for n in header if n.startswith("model.layers.0."))
        header[name] = {**header[name], **changes}
        encoded = json.dumps(header).encode()
        (folder / "model.safetensors").write_bytes(struct.pack("<Q", len(encoded)) + encoded + raw[8 + length :])

    return edit


def config_edit(**changes):
    def edit(folder: Path) -> None:
        config = json.loads((folder / "config.json").read_text())
        (folder / "config.json").write_text(json.dumps({**config, **changes}))

    return edit


# name -> (how the folder is damaged, what the sentence says)
MALFORMED = {
    "config-not-json": (lambda f: (f / "config.json").write_text("{not json"), "config.json of .* is not valid JSON"),
    "config-a-list": (lambda f: (f / "config.json").write_text("[1, 2]"), "is not a JSON object \\(it holds a list\\)"),
    "config-empty": (lambda f: (f / "config.json").write_text(""), "config.json of .* is not valid JSON"),
    "layers-six": (config_edit(num_hidden_layers="six"), "has num_hidden_layers 'six' in its config"),
    "shard-empty": (lambda f: (f / "model.safetensors").write_bytes(b""), r"not a safetensors file \(it has 0 bytes"),
    "header-not-json": (
        lambda f: (f / "model.safetensors").write_bytes(struct.pack("<Q", 5) + b"hello"),
        "model.safetensors.s header is not valid JSON",
    ),
    "offsets-past-end": (edit_tensor(data_offsets=[0, 2**40]), "bytes lie past the end of the file"),
    "unknown-dtype": (edit_tensor(dtype="Q9"), "dtype 'Q9', which is not one"),
    "negative-shape": (edit_tensor(shape=[-64, 64]), "negative dimension"),
    "huge-shape": (edit_tensor(shape=[2**40, 2**40]), "larger than any tensor can be"),
}


@pytest.fixture(scope="module")
def malformed(tiny_llama, tmp_path_factory) -> Path:
    """A root holding a damaged copy of tiny_llama per kind of damage."""
    root = tmp_path_factory.mktemp("malformed")
    for name, (damage, _) in MALFORMED.items():
        shutil.copytree(tiny_llama, root / name)
        damage(root / name)
    return root


def cli(capsys, *args: str) -> str:
    """The CLI's one line on stderr; it must exit 2."""
    assert main(list(args)) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def recipe_file(tmp_path: Path, model: str, end: int | str = 2, extra: str = "") -> str:
    path = tmp_path / "recipe.yml"
    path.write_text(f"slices:\n- sources:\n  - model: {json.dumps(model)}\n    layer_range: [0, {end}]\n{extra}")
    return str(path)


@pytest.mark.parametrize("name", list(MALFORMED))
def test_a_malformed_local_model_is_one_line_in_the_cli(capsys, tmp_path, malformed, name):
    line = cli(capsys, "params", recipe_file(tmp_path, str(malformed / name)))
    assert re.search(MALFORMED[name][1], line)


@pytest.fixture
def web_root(monkeypatch, malformed):
    import ui.models

    monkeypatch.setattr(ui.models, "POLICY", LocalPolicy(allow_any_path=False, roots=(malformed.resolve(),)))
    ui.models.public_info.cache_clear()
    yield malformed
    ui.models.public_info.cache_clear()


@pytest.mark.parametrize("name", list(MALFORMED))
def test_a_malformed_allowed_folder_is_a_sentence_on_the_page(web_root, name):
    _, message = app.find_column(name)
    assert message.startswith("⚠️ ") and re.search(MALFORMED[name][1], shown(message))
    with pytest.raises(gr.Error) as refused:
        app.preview(f"slices:\n- sources:\n  - {{model: {name}, layer_range: [0, 2]}}\n")
    assert re.search(MALFORMED[name][1], refused.value.message)


def test_a_name_part_over_255_bytes_is_a_sentence(capsys, tmp_path, web_root):
    assert "File name too long" in cli(capsys, "params", recipe_file(tmp_path, f"/tmp/{LONG_PART}"))
    smol = recipe_file(tmp_path, "bundled:smollm2-135m-instruct")
    assert "File name too long" in cli(capsys, "build", smol, f"/tmp/{LONG_PART}")
    assert "File name too long" in cli(capsys, "slim", f"/tmp/{LONG_PART}", str(tmp_path / "out"))
    _, message = app.find_column(LONG_PART)
    assert "cannot name a folder: File name too long" in shown(message)


@pytest.mark.parametrize(
    ("args", "said"),
    [
        (("--shard-size", "inf"), "'inf' is not a size like 500M or 5GB"),
        (("--shard-size=-5GB",), "'-5GB' is not a size like 500M or 5GB: a shard holds at least one byte"),
    ],
)
def test_a_shard_size_that_is_no_size_is_one_line(capsys, tmp_path, tiny_llama, args, said):
    assert said in cli(capsys, "build", recipe_file(tmp_path, str(tiny_llama)), str(tmp_path / "out"), *args)
    assert not (tmp_path / "out").exists()


def test_an_output_path_that_is_a_file_is_one_line(capsys, tmp_path, tiny_llama):
    target = tmp_path / "taken"
    target.write_text("mine")
    assert "is a file, not a folder" in cli(capsys, "build", recipe_file(tmp_path, str(tiny_llama)), str(target))
    assert target.read_text() == "mine"


def test_recipe_mistakes_that_crashed_are_one_line_in_the_cli_and_a_sentence_on_the_page(capsys, tmp_path, tiny_llama):
    ref = str(tiny_llama)
    cases = {
        recipe_file(tmp_path, ref, end=10**30): "more than the 1,024 layers",
        recipe_file(tmp_path, ref, extra="tokenizer_source: [1]\n"): "names a model, or is base or union",
    }
    deep = tmp_path / "deep.yml"
    deep.write_text("slices: " + "[" * 5000 + "]" * 5000)
    cases[str(deep)] = "levels of nesting, more than the 32"
    for path, said in cases.items():
        assert said in cli(capsys, "params", path)
        refused = app.apply_yaml(Path(path).read_text(), empty_state(), VISITOR, None, *SETTINGS)
        assert said in shown(refused.yaml_note)


def test_chat_settings_and_text_that_crashed_are_one_line_in_the_cli(capsys, tiny_llama):
    ref = str(tiny_llama)
    assert "`seed` is 1,180,591,620,717,411,303,424" in cli(capsys, "chat", ref, "--prompt", "hi", "--seed", str(2**70))
    surrogate = "hi \udcff"  # what Python makes of a byte that is not UTF-8 in the command line
    assert "contains U+DCFF" in cli(capsys, "chat", ref, "--prompt", surrogate, "--max-new-tokens", "2")


def test_an_unexpected_failure_on_the_page_is_said_not_a_bare_error(monkeypatch):
    def broken(plan) -> dict:
        raise KeyError("num_hidden_layers")

    monkeypatch.setattr(app, "preview_counts", broken)
    with pytest.raises(gr.Error, match=r"Something failed on our side \(KeyError\)"):
        app.preview(passthrough(("bundled:smollm2-135m-instruct", 0, 2)).to_yaml())
