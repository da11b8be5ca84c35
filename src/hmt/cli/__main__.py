"""`python -m hmt.cli`: the same as the `hmt` command."""

from hmt.cli import main

main()
