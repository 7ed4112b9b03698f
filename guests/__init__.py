"""Guest image recipes: each builds a bootable guest offline (see guests/README.md)."""
