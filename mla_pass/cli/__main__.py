"""``python -m mla_pass.cli``: the same as the ``mla-pass`` command."""
import sys

from .commands import main

sys.exit(main())
