"""`alphallm` subcommands: each module defines `define_flags()` and `main(argv)`."""
