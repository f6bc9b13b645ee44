"""`python -m p3bkit`: the same command line as the `p3bkit` script."""

from p3bkit.cli import main

main()
