"""The library's logger. A library is silent unless asked: it has a NullHandler, so its
records go nowhere until the application configures logging (then INFO and WARNING of
"slurmexecutor" show as usual). Not imported by the worker, to keep its start-up small."""

from __future__ import annotations

import logging

log = logging.getLogger("slurmexecutor")
if not any(isinstance(handler, logging.NullHandler) for handler in log.handlers):
    log.addHandler(logging.NullHandler())
