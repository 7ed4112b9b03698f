"""Artifacts: guest images and files, named by a manifest and cached on disk.

manifest (the schema of artifacts.toml, the path policy for its names, the loader),
store (ArtifactStore: download, verify, build through a recipe, cache), files (untrusted
files opened, hashed and sealed safely). artifacts.toml is the manifest phd ships. Stands on
phd.core.
"""
