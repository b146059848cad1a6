"""``python -m audit``: the ``gradledger`` command."""

from audit.cli import main

main()
