"""What every guest recipe shares: the build protocol (``recipe.py``: input-hash cache, lock,
atomic swap, command line) and the parts recipes assemble guests from - Debian packages
(``debian.py``), the kernel and its modules in load order (``kernel.py``, ``kmods.py``) and the
initramfs writer (``cpio.py``). A recipe's input hash covers the files of this folder it
imports (its ``SHARED_FILES``, see ``recipe.shared_digest``)."""
