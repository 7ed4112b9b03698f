"""The alpine guest: the official Alpine minirootfs with Debian's kernel, as an initramfs."""
