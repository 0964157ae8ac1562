"""Runs read back from their folder: status tables (`runs`, `calltable`, `reading`, with
the scheduler's states asked once) and the HTML report (`report*`)."""
