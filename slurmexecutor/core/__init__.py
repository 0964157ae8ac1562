"""The pure decision core: `state.Core.step(events, now) -> actions`, its policies
(`policies`, `joins`), its bookkeeping (`ledger`) and vocabulary (`events`). No I/O."""
