"""Entry point: ``python -m sut.server --listen 127.0.0.1:PORT --data-dir DIR``."""

import sys

from sut.server.cli import main

sys.exit(main())
