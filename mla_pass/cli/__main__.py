"""``python -m mla_pass.cli``: the same as the ``mla-pass`` command."""
import sys

from .main import main

sys.exit(main())
