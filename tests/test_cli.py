"""The command line: the demo runs end to end (tiny settings) and reports sparsity."""

import pytest

from hf_stochact.cli import main


def test_demo_runs_and_reports_sparsity(capsys, tmp_path):
    assert main(["demo", "--steps", "6", "--batch-size", "4", "--block-size", "32", "--hidden-size", "32",
                 "--intermediate-size", "64", "--layers", "1", "--heads", "2", "--vocab-size", "300",
                 "--train-chars", "60000", "--relu-fraction", "0.5", "--eval-blocks", "4",
                 "--output-dir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "StochA, sampling (train mode)" in out and "after ReLU fine-tune (final)" in out
    assert "FFN zeros" in out and "config.hidden_act = 'relu'" in out
    assert (tmp_path / "final" / "config.json").exists()


def test_unknown_command_exits_with_usage():
    with pytest.raises(SystemExit):
        main(["nope"])
