"""Shared test settings.

The test machines have 2 shared CPU cores: intra-op parallelism on tiny tensors spends
most of its time waiting for a busy sibling thread (10-40x slower elementwise ops under
load), so tests run single-threaded unless DIFFEM_TEST_THREADS says otherwise.
"""

import os

import torch

torch.set_num_threads(int(os.environ.get("DIFFEM_TEST_THREADS", "1")))
