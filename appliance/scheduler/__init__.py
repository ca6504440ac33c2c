"""The numpy scheduling core (queues, batcher, profile, capacity) and its thin worker shell."""
