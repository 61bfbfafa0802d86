"""``python -m bec``: the ``bec`` command where no console script is installed (a machine
whose Python cannot take the package, only its source on ``PYTHONPATH``)."""
from bec.cli import main

main()
