# Writes the torch.save fixtures of tests/io_test.cpp (run with Debian's python3 + torch 1.13:
#   /usr/bin/python3 tests/data/make_torch_fixtures.py tests/data).
import sys
from collections import OrderedDict

import torch


def state_dict():
    base = torch.arange(12, dtype=torch.float32).reshape(3, 4) * 0.5 - 1
    sd = OrderedDict()
    sd["linear.weight"] = base                       # contiguous
    sd["linear.weight_t"] = base.t()                 # non-contiguous view of the same storage
    sd["row"] = base[1]                              # storage offset 4
    sd["col"] = base[:, 2]                           # offset 2, stride 4
    sd["bn.num_batches_tracked"] = torch.tensor(7)   # 0-dim int64 buffer
    sd["ids"] = torch.tensor([-3, 1 << 40, 5], dtype=torch.int64)
    sd["half"] = torch.tensor([1.5, -2.0, 0.25], dtype=torch.float16)
    sd["bf16"] = torch.tensor([1.0, -3.0], dtype=torch.bfloat16)
    sd["mask"] = torch.tensor([True, False, True])
    sd["double"] = torch.tensor([[1.25], [2.5]], dtype=torch.float64)
    sd["param"] = torch.nn.Parameter(torch.tensor([0.125, -0.25]))  # pickled via _rebuild_parameter
    sd["expanded"] = torch.tensor([1.0, 2.0]).expand(3, 2)          # stride 0
    sd["empty"] = torch.zeros(0, 3)
    return sd


out = sys.argv[1] if len(sys.argv) > 1 else "."
torch.save(state_dict(), f"{out}/torch_small.bin")
torch.save(state_dict(), f"{out}/torch_small_legacy.bin", _use_new_zipfile_serialization=False)
