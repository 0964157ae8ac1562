"""Applications on top of the executor: the `slurmexecutor` command (`cli`, `cli_watch`),
the run report (`report*`), the read-counting job (`countreads`) and the joblib backend."""
