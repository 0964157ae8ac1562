"""`python -m slurmexecutor` is the `slurmexecutor` command."""

import sys

from slurmexecutor.apps.cli import main

sys.exit(main())
