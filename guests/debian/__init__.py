"""The debian guest: Debian 12 with systemd and sshd on an ext4 disk image, built offline."""
