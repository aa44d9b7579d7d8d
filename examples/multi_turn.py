"""Two chat turns over one compressed cache: the second turn compresses only its own tokens.

    python examples/multi_turn.py
    python examples/multi_turn.py --model /path/to/hf/folder   (a chat model: its tokenizer has a chat template)
"""

import argparse

import torch

import nqcompile
from nqcompile.models import load_pretrained

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("--model", default=None, help="local HuggingFace model folder (default: SmolLM2-135M-Instruct)")
args = parser.parse_args()

model, tokenizer = load_pretrained(args.model)
model = nqcompile.optimize(model, "balanced", tokenizer=tokenizer)
messages = [{"role": "user", "content": "Name three novels by Jane Austen."}]
cache = None
for follow_up in ("Which one came first?", None):
    # The whole conversation so far; generate feeds only the tokens the cache has not seen.
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=40, do_sample=False, past_key_values=cache,
                             return_dict_in_generate=True)
    cache = out.past_key_values
    answer = tokenizer.decode(out.sequences[0, ids.shape[1]:], skip_special_tokens=True)
    print(f"assistant: {answer}\n")
    messages.append({"role": "assistant", "content": answer})
    if follow_up:
        messages.append({"role": "user", "content": follow_up})
print(cache.memory_report())
