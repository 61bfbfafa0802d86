"""The ``ldv1`` job kind: line detection with the project's own small model.

Importing the package loads nothing heavy: the CLI and the local stack read the shipped
model's path from here without loading torch."""
from pathlib import Path

#: The model BEC ships (trained by ``python -m bec.tools.train_ldv1``).
SHIPPED_WEIGHTS = Path(__file__).resolve().with_name("weights") / "small.pth"
