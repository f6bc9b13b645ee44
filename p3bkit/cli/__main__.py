"""`python -m p3bkit.cli` (e.g. under torchrun): the same command line as the `p3bkit` script."""

from p3bkit.cli import main

main()
