"""``python -m cimconvert`` runs the CLI."""

from cimconvert.cli import main

main()
