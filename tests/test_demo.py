"""demo.py: train_repae.py runs as a child process and the report comes from its summary.json."""
import json
from pathlib import Path

import pytest

import demo


def test_demo_runs_the_trainer_and_returns_its_summary(tmp_path, capfd):
    summary = demo.main(["--out", str(tmp_path), "--max-train-steps", "2"])
    written = json.loads((tmp_path / "repae_cpu" / "summary.json").read_text())
    assert summary == written and summary["start_step"] == 0 and summary["end_step"] == 2
    out = capfd.readouterr().out
    assert "REPA-E demo (CPU preset) finished" in out and "VAE reconstruction PSNR" in out
    assert summary["checkpoints"] and Path(summary["checkpoints"][-1]).is_file()


def fake_trainer(tmp_path, monkeypatch, body: str) -> Path:
    script = tmp_path / "train_repae.py"
    script.write_text("import sys\n" + body + "\n")
    monkeypatch.setattr(demo, "TRAINER", script)
    return tmp_path / "summary.json"


def test_a_failed_trainer_is_an_error_naming_its_exit_code(tmp_path, monkeypatch):
    summary = fake_trainer(tmp_path, monkeypatch, "print(sys.argv[1:]); sys.exit(3)")
    with pytest.raises(SystemExit, match=r"train_repae\.py exited with code 3 .*--flag x"):
        demo.run_trainer(["--flag", "x"], summary)


def test_a_stale_summary_is_not_reported(tmp_path, monkeypatch):
    """A trainer that exits 0 without writing summary.json leaves the previous run's file: refused."""
    summary = fake_trainer(tmp_path, monkeypatch, "sys.exit(0)")
    summary.write_text(json.dumps({"end_step": 1}))
    with pytest.raises(SystemExit, match="did not write"):
        demo.run_trainer([], summary)
    fake_trainer(tmp_path, monkeypatch, f"open({str(summary)!r}, 'w').write('{{\"end_step\": 7}}')")
    assert demo.run_trainer([], summary) == {"end_step": 7}
