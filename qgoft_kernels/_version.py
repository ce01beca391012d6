"""The package version (pyproject.toml has the same; ``tests/test_cli.py`` checks they agree)."""
__version__ = "0.1.0"
