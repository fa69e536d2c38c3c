"""``python -m teacher_zoo check|list|verify`` (see :mod:`teacher_zoo.cli`)."""
import sys

from teacher_zoo.cli import main

sys.exit(main())
