"""The resource cases of a hostile visitor, shared by the tests and benchmarks/abuse.py."""

import base64
import json
import zlib

SMOL = "bundled:smollm2-135m-instruct"
NESTED_LOOPS = "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}x"
MILLION_LAYER_SLICES = 660  # each [0, 30) repeated 64 times: 1,267,200 layers


def share_token(payload: dict) -> str:
    raw = zlib.compress(json.dumps(payload, separators=(",", ":")).encode(), 9)
    return "v1." + base64.urlsafe_b64encode(raw).decode().rstrip("=")


def filter_alias_bomb() -> str:
    """A blend weight of nine levels of nine `{filter, value}` entries, each level defined inside
    the first entry of the level above and aliased by the other eight: 9^9 values in about 2 KB."""
    level = "&v0 [{filter: a, value: 1}]"
    for depth in range(1, 10):
        entries = [f"{{filter: a, value: {level}}}", *[f"{{filter: a, value: *v{depth - 1}}}"] * 8]
        level = f"&v{depth} [{', '.join(entries)}]"
    return (
        f"merge_method: linear\nslices:\n- sources:\n  - {{model: {SMOL}, layer_range: [0, 2], "
        f"parameters: {{weight: {level}}}}}\n  - {{model: o/m, layer_range: [0, 2]}}\n"
    )


def slice_alias_recipe(copies: int = 100_000) -> str:
    """One slice written once and aliased `copies` times (400 KB for 100,000)."""
    return "slices:\n- &s {sources: [{model: " + SMOL + ", layer_range: [0, 2]}]}\n" + "- *s\n" * copies


def million_layer_link() -> str:
    """A share link of a few hundred characters holding 1.25 M layers."""
    slices = [{"sources": [{"model": SMOL, "start": 0, "end": 30}], "repeat": 64}] * MILLION_LAYER_SLICES
    return share_token({"recipe": {"slices": slices}, "settings": {}})


def million_layer_yaml() -> str:
    """The same recipe as YAML, for the preview endpoint."""
    return "slices:\n" + f"- sources: [{{model: {SMOL}, layer_range: [0, 30]}}]\n  repeat: 64\n" * MILLION_LAYER_SLICES


def half_megabyte_card() -> bytes:
    """A card within every field limit whose 32,000-character name is used 4,000 times."""
    card = {"name": "N" * 32_000, "description": "{{char}} " * 3_500, "personality": "{{char}}" * 500}
    card |= {key: "x" * 31_000 for key in ("scenario", "first_mes", "mes_example", "system_prompt")}
    card |= {"post_history_instructions": "y" * 31_000, "alternate_greetings": ["z" * 30_000] * 12}
    return json.dumps(card).encode()
