"""One arena cell end to end on SmolLM2 at a short length, and the CLI resuming a store."""

from __future__ import annotations

import pytest

pytest.importorskip("transformers")

from typer.testing import CliRunner  # noqa: E402

from longattn import models  # noqa: E402
from longattn.arena.job import ArenaJob, parse_length  # noqa: E402
from longattn.arena.store import Cell, ResultStore  # noqa: E402
from longattn.arena.tasks import build_prompt  # noqa: E402
from longattn.cli import app  # noqa: E402

try:
    models.gguf_path("smollm2-135m")
except models.ModelNotAvailableError as err:  # pragma: no cover
    pytest.skip(str(err), allow_module_level=True)


def test_parse_length():
    assert parse_length("2k") == 2048 and parse_length("1500") == 1500 and parse_length("0.5k") == 512
    with pytest.raises(ValueError, match="not a number of tokens"):
        parse_length("two")


def test_cell_metrics_full_vs_window():
    model, tok = models.load("smollm2-135m")
    job = ArenaJob(model, tok, model_name="smollm2-135m", timing=False)
    full = job(Cell("smollm2-135m", "full", "passkey", 300, 0, 0, {}))
    assert full["score"] == 1.0 and full["kl"] < 1e-8 and full["density"] == 1.0
    assert len(full["layer_rel_error"]) == 30 and max(full["layer_rel_error"]) < 1e-5
    assert min(full["layer_mass_recall"]) > 1 - 1e-5
    win = job(Cell("smollm2-135m", "window", "passkey", 300, 0, 0, {"window": 32, "block_size": 32}))
    assert 0 < win["density"] < 0.3 and win["kl"] > 1e-4
    assert max(win["layer_rel_error"]) > 1e-2 and min(win["layer_mass_recall"]) < 0.99
    assert abs(win["prompt_tokens"] - 300) <= 6


def test_cli_arena_runs_and_resumes(tmp_path):
    runner = CliRunner()
    args = ["arena", "--methods", "full,moba", "--tasks", "passkey", "--lengths", "256", "--samples", "1",
            "--config", "moba.block_size=64", "--config", "moba.top_k=2", "--no-timing",
            "--store", str(tmp_path / "a.sqlite")]
    first = runner.invoke(app, args)
    assert first.exit_code == 0, first.output
    assert "2 cells, 0 already" in first.output
    second = runner.invoke(app, args)
    assert second.exit_code == 0 and "2 cells, 2 already" in second.output
    with ResultStore(tmp_path / "a.sqlite") as store:
        rows = list(store.rows())
    assert sorted(r["method"] for r in rows) == ["full", "moba"]
    assert [r["config"] for r in rows if r["method"] == "moba"] == [{"block_size": 64, "top_k": 2}]
    rep = runner.invoke(app, ["report", "--store", str(tmp_path / "a.sqlite"), "--out", str(tmp_path / "r")])
    assert rep.exit_code == 0, rep.output
    assert (tmp_path / "r" / "report.html").exists()


def test_generation_never_masks_prompt_tokens(monkeypatch):
    """The prompt is one unpadded sequence: generate() must see an all-ones mask even when the
    pad id it is given occurs in the prompt (the chat template's ``<|im_start|>``, which
    transformers 5.17 reported as a GGUF tokenizer's eos). A masked prompt token would send
    NSA (which takes no model mask) to an error and every other method to a masked path."""
    import longattn.hf as lhf

    model, tok = models.load("smollm2-135m")
    im_start = tok.convert_tokens_to_ids("<|im_start|>")
    monkeypatch.setattr(model.generation_config, "pad_token_id", im_start)
    tok.eos_token = "<|im_start|>"  # as transformers 5.17 reads the GGUF (models.load fixes it)
    masked = []
    real = lhf._masked_selection_attention
    monkeypatch.setattr(lhf, "_masked_selection_attention", lambda *a: masked.append(1) or real(*a))
    job = ArenaJob(model, tok, model_name="smollm2-135m", timing=False, fidelity=False)
    out = job(Cell("smollm2-135m", "nsa", "passkey", 300, 0, 0, {"num_selected": 4, "window": 32}))
    assert out["prompt_tokens"] > 250 and not masked
    sample = job.sample_of(Cell("smollm2-135m", "nsa", "passkey", 300, 0, 0, {}))
    assert im_start in job._ids(build_prompt(sample, tok))[0]  # the case the test is about
