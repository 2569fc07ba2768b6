"""The reference harness: the original 2017 `expert_utils.py` run next to
keras_moe, for the parity tests, the fixture tools and the benchmarks.

Not part of keras_moe (setup.py packages `keras_moe` only): tests
(pytest.ini's `pythonpath = .`), `tools/` and `benchmarks/` import it from
the repository root. The original itself is not part of this project
either; `original` finds it and loads it from its path at run time.

    original           finding and loading the original; the TF1 session
    cases              what the case descriptions share: MODES, seeds, sizes
    flat               the flat MoE cases (tests/fixtures/parity.npz)
    hierarchical       DistributedMixtureOfExperts, hierarchical and flat,
                       over datashards (parity_hierarchical.npz); building
                       and setting the original's MoE
    checkpoints        TF1 checkpoints written by the original
                       (tf1_checkpoints/)
    embedding_softmax  ParallelEmbeddingLookup, SampledSoftmaxLoss and
                       ParallelSampledSoftmaxLoss (embedding_softmax.npz)
    fixtures           the one .npz format of every fixture file
    cpu_settings       which CPU and oneDNN setting the numbers come from

`flat`, `hierarchical` and `embedding_softmax` are *suites*: each has
`CASES`, `CASES_BY_NAME`, `make_data(case)`, `run_original(module, case,
data)`, its fixture file `FIXTURES` and the `TOOL` that writes it.
"""

import os

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FIXTURES_DIR = os.path.join(REPO_ROOT, "tests", "fixtures")
