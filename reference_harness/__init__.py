"""The reference harness: what the tests, `tools/` and `benchmarks/` share
that is not part of keras_moe (setup.py packages `keras_moe` only). Tests
import it through pytest.ini's `pythonpath = .`; tools and benchmarks put
the repository root on sys.path.

    cpu_settings       which CPU and oneDNN setting the numbers come from
"""

import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
