"""Rows -> prepared ArrayRecord datasets (`builders.py`: the TFDS builders; `registry.py`: the table of dataset
families; `build.py`: build and verify), and reading a built split fast (`records.py`)."""
