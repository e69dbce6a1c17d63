"""``python -m localllm``: the same as the ``localllm`` command."""

import sys

from .cli import main

sys.exit(main())
