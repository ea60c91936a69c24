"""``python -m search.cli``: the ``search`` command."""

from search.cli.main import app

app()
