"""`python -m builder` is the `modelpack` command."""

from builder.cli import main

main()
