"""The owner thread (`engine`) and what it drives: requests and windows (`intake`,
`handoff`, `dependencies`), writing batches, reading streams, turning verdicts into
outcomes, the result cache's client side, reattaching, and the end (`teardown`)."""
