"""``python -m hf_babai`` = the ``hf-babai`` command."""

import sys

from .cli import main

sys.exit(main())
