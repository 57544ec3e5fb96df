"""``python -m expertmix`` runs the CLI."""

from .cli import main

main()
