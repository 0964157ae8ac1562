"""What an array task runs: the supervisor (`supervisor`, `python -m slurmexecutor.worker`)
and its forked child (`child`). Imports nothing of the client side."""
