"""How tests start a Python that imports edgemoe: `python -P`.

-P keeps the current directory (and a script's directory) off sys.path. Without it, `python -m edgemoe` started
from the checkout imports the source tree's edgemoe/, which has no compiled C core after `pip install .`, instead of
the installed package the tests themselves import."""
import sys

PYTHON = [sys.executable, "-P"]
