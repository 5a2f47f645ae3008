"""``python -m keras_ce_plugin.cli``: the ``keras-ce`` commands (the console script,
``keras_ce_cli``, also drops TensorFlow's start-up notices)."""

import sys

from keras_ce_plugin.cli import main

if __name__ == "__main__":
    sys.exit(main())
