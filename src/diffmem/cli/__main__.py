"""`python -m diffmem.cli` (and `accelerate launch -m diffmem.cli`): the `diffmem` command."""

from diffmem.cli import main

main()
