"""Repository conftest: the phd plugin is loaded through its `pytest11` entry point
(`pip install -e .`); this file only makes the intent explicit for readers."""
