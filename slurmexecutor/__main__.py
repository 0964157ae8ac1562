"""`python -m slurmexecutor` is the `slurmexecutor` command."""

import sys

from .cli import main

sys.exit(main())
