"""The package's version (pyproject.toml's), which model cards record."""

__version__ = "0.1.0"
