"""``python -m keras_ce_plugin.cli``: the same as the ``keras-ce`` console script."""

import sys

from keras_ce_plugin.cli import main

if __name__ == "__main__":
    sys.exit(main())
