"""The run folder's protocol, shared by the client and the workers: layout, signed blobs
and record streams (`spool`), claims, shared arguments, the lease, warm-task signals,
the result cache's files, and reading runs back (`runs`, `calltable`)."""
