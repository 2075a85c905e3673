"""Tokenizer sources (mergekit's `tokenizer_source`, or the `source` of its `tokenizer:` mapping):
which tokenizer a merge ships, and whether the embedding and head rows it takes line up with it.

mergekit 0.1.5 ships the base model's tokenizer files when no source is set. When one is set (a
model, `base` or `union`), it builds the merge's vocabulary (that model's; the base model's
without ids past its vocab_size; or the union of every model's) and rebuilds each
vocabulary-indexed tensor (embeddings, an untied head) for it: row i becomes the source model's
row for the token whose id is i, and the tensor gets one row per token. Where every model whose
rows the merge takes gives each token of that vocabulary the same id, and has exactly one row
per token, the rebuild changes nothing: that is the merge this app builds, equal to mergekit's.
Moving rows to another vocabulary is not done here; a recipe that needs it is refused with the
reason, rather than shipping a tokenizer that does not match its embeddings.

Vocabularies are read from tokenizer.json with the `tokenizers` library (no torch), cached per file.
"""

from __future__ import annotations

import functools
from collections.abc import Iterable

from merger.errors import RecipeError
from merger.recipe import Recipe
from merger.sources.model_info import ModelInfo

Vocabulary = dict[str, int]  # token -> id, added tokens included (what transformers' get_vocab() gives)


def vocabulary(info: ModelInfo) -> Vocabulary:
    """The token ids of a model's tokenizer; refused when it has no tokenizer.json to read them from."""
    path = info.tokenizer_dir / "tokenizer.json" if info.tokenizer_dir else None
    if path is None or not path.is_file():
        raise RecipeError(
            f"{info.ref} has no tokenizer.json, so its vocabulary cannot be compared with the tokenizer_source's"
        )
    stat = path.stat()
    try:
        return _read_vocabulary(str(path), stat.st_size, stat.st_mtime_ns)
    except Exception:  # the tokenizers library raises plain Exceptions for files it cannot read
        raise RecipeError(f"{info.ref}'s tokenizer.json cannot be read as a tokenizer") from None


@functools.lru_cache(maxsize=16)
def _read_vocabulary(path: str, size: int, mtime_ns: int) -> Vocabulary:  # size, mtime: a changed file is reread
    from tokenizers import Tokenizer

    return Tokenizer.from_file(path).get_vocab(with_added_tokens=True)


def _within(vocab: Vocabulary, size: int) -> Vocabulary:
    """The tokens whose ids have a row (mergekit leaves out ids past the config's vocab_size)."""
    return {token: i for token, i in vocab.items() if i < size}


def _vocab_size(info: ModelInfo) -> int:
    return int(info.config.get("vocab_size") or 0) or len(vocabulary(info))


def shipped_tokenizer(recipe: Recipe, models: dict[str, ModelInfo], rows: Iterable[tuple[str, int]]) -> str:
    """The model whose tokenizer files the merge ships. `rows`: (model, number of rows) of every
    vocabulary-indexed tensor the merge takes. Raises RecipeError where mergekit would move or cut
    those rows for the recipe's tokenizer source (see the module's docstring)."""
    source = recipe.vocabulary_source
    if source is None:
        return recipe.primary_model
    ship = recipe.primary_model if source in ("base", "union") else source
    merged = vocabulary(models[ship])
    if source in ("base", "union"):  # mergekit strips the base's tokenizer to its rows first
        merged = _within(merged, _vocab_size(models[ship]))
    if source == "union":
        _check_union(merged, ship, recipe.models, models)
    if sorted(merged.values()) != list(range(len(merged))):
        raise RecipeError(f"{ship}'s tokenizer numbers its tokens with gaps; mergekit cannot rebuild embeddings for it")
    for model, count in dict.fromkeys(rows):
        own = _within(vocabulary(models[model]), _vocab_size(models[model]))
        moved = next((t for t, i in sorted(merged.items(), key=lambda item: item[1]) if own.get(t) != i), None)
        if moved is not None:
            where = "it lacks" if moved not in own else f"its id is {own[moved]} there, {merged[moved]} in the merge's"
            raise RecipeError(
                f"`tokenizer_source: {source}` gives the merge {ship}'s vocabulary, which {model} (whose embedding "
                f"or head rows the merge takes) does not share: token {moved!r} ({where}); mergekit would move "
                "its rows to that vocabulary, which this app does not do. Take the first and last slices from a "
                f"model that shares {ship}'s tokenizer, or leave tokenizer_source out (the merge then ships "
                f"{recipe.primary_model}'s tokenizer, as mergekit does)"
            )
        if count != len(merged):
            raise RecipeError(
                f"`tokenizer_source: {source}` makes mergekit resize {model}'s embedding and head rows from {count:,} "
                f"to the {len(merged):,} tokens of {ship}'s tokenizer (and vocab_size with them), which this app "
                "does not do; leave tokenizer_source out to keep the rows as they are"
            )
    return ship


def _check_union(merged: Vocabulary, base: str, refs: list[str], models: dict[str, ModelInfo]) -> None:
    """`union` over models that share one vocabulary is that vocabulary; over others it is refused."""
    for ref in refs:
        if _within(vocabulary(models[ref]), _vocab_size(models[ref])) != merged:
            raise RecipeError(
                f"`tokenizer_source: union` builds one vocabulary from every model's tokenizer and moves each "
                f"model's embedding rows to it; {ref}'s vocabulary differs from {base}'s, and this app does not "
                "merge vocabularies. Use `tokenizer_source: base` (the base model's tokenizer) or name one model "
                "whose tokenizer the merge ships, and take the first and last slices from models that share it"
            )
