import sys; sys.path.insert(0, ".")
import torch
from benchmarks.decode_attention import parse_args, inputs, run_kernel
a = inputs(parse_args([]), 32768, 4, 2)
for _ in range(3): run_kernel(a)
torch.cuda.synchronize()
