"""The HTTP layer, the Ray shell and the spreadsheet side must not import torch.

Heavy imports belong to the model replica; importing them elsewhere slows every
cold start and every Excel recalculation.
"""

import subprocess
import sys

import pytest

LIGHT = [
    "serve_app",
    "serve_app.config",
    "serve_app.api",
    "serve_app.service",
    "serve_app.deployments",
    "excel_addin",
    "excel_addin.cells",
    "excel_addin.client",
    "excel_addin.udfs",
    "excel_addin.demo",
]


@pytest.mark.parametrize("module", LIGHT)
def test_module_imports_without_torch(module):
    code = (
        f"import sys, pickle; import {module}; "
        "from serve_app.service import Encoded; import numpy as np; "
        # The ingress unpickles the replica's answers: that must stay light too.
        "pickle.loads(pickle.dumps(Encoded(np.zeros((1, 2), np.float32), [1], [False]))); "
        "heavy = [m for m in ('torch', 'transformers', 'sentence_transformers') if m in sys.modules]; "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "", f"{module} imported {out.stdout.strip()}"
