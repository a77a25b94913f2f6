"""Test-session settings shared by every test file."""

import torch

# The tests run thousands of tiny steps. On a small, shared CPU the cost of waking a second
# intra-op thread for every tiny kernel dominates: measured here a 100-step parity run took
# ~10 s with 2 threads under load and ~0.15 s with one. Results do not depend on this.
torch.set_num_threads(1)
