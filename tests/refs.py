"""Model references read as the CLI reads them: any local folder (the tests' tiny models live in
temporary folders). Web handlers read them under ui.models' policy instead."""

from merger.sources.catalog import LocalPolicy, resolver_for

ANY_PATH = resolver_for(LocalPolicy.any_path())
