"""`python -m slurmexecutor.worker RUN_DIR BATCH TASK`: an array task's worker."""

import sys

from slurmexecutor.worker.supervisor import main

sys.exit(main(sys.argv[1:]))
