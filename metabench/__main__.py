"""``python -m metabench`` (and ``torchrun ... -m metabench run ...``): the ``metabench`` command."""
import sys

from .cli import main

sys.exit(main())
