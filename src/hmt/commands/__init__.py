"""The bodies of the `hmt` commands: console output and files around the library calls."""
