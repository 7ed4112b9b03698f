"""The tiny guest: Debian's kernel plus a busybox initramfs, built offline in seconds."""
