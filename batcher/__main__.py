"""``python -m batcher``: the same as the ``batcher`` command."""

import sys

from batcher.cli.main import console_main

sys.exit(console_main())
