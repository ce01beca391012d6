"""The package's name, version and adapter format version, below every module that records them.

pyproject.toml has the same version; ``tests/test_cli.py`` checks that they agree.
"""
PACKAGE = "qgoft-kernels"
__version__ = "0.1.0"
#: The format version of the adapter files (``qk.save_adapter``) and of ``config.qgoft_adapter``.
ADAPTER_FORMAT = "2"
