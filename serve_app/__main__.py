"""`python -m serve_app`: see serve_app.launch."""

import sys

from serve_app.launch import main

sys.exit(main(sys.argv[1:]))
