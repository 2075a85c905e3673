"""What a Markdown string shows once rendered: the page backslash-escapes names and messages
(ui/text.py), and tests read the text a visitor sees."""

import re


def shown(markdown: str) -> str:
    return re.sub(r"\\(.)", r"\1", markdown)
