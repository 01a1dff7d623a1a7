"""`python -m serve_app`: see serve_app.ray_shell.launch."""

import sys

from serve_app.ray_shell.launch import main

sys.exit(main(sys.argv[1:]))
