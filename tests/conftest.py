"""Test-session settings.

The tests run small shapes, where intra-op threads cost more than they give; on a shared or busy machine two
spinning OpenMP threads per tiny op made single tests 30x slower (70 s instead of 2 s). One thread keeps the suite
fast and its timing stable. Benchmarks, not tests, measure multi-threaded speed.
"""

import torch

torch.set_num_threads(1)
