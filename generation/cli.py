"""`loraloop serve` and `loraloop imagine`."""

commands: list = []
