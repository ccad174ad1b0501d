"""``python -m mvgen``: the same as the ``mvgen`` command."""
import sys

from .cli import main

sys.exit(main())
