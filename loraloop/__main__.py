"""`python -m loraloop ...`: the same as the `loraloop` command (handy under `accelerate launch -m`)."""

from loraloop.cli import main

main()
