"""``python -m imram`` is the ``imram`` command (torchrun needs the module form)."""

import sys

from imram.cli import main

sys.exit(main())
