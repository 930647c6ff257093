"""The data plane: worker processes that encrypt and decrypt their shard of the traffic."""
