"""What producers and the worker share: the change, settings, errors, keys, states, the ledger."""
