"""Inside each DDP worker: the training loop (loop.py), plain torch but for where it meets Ray."""
