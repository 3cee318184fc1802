"""The command line's parsing, without running anything."""

from __future__ import annotations

import pytest

from batcher.cli.main import sim_batch_settings
from batcher.cli.parser import build_parser, parse_command_line
from batcher.sim.config import SimConfig


def test_sim_batch_flags_set_the_simulated_batches_time_scale() -> None:
    args = build_parser().parse_args(
        ["sim", "--batch-validating-s", "0", "--batch-in-progress-s", "0.5",
         "--batch-finalizing-s", "0.1", "--batch-window-s", "30", "--batch-error-rate", "0.2"]
    )  # fmt: skip
    batch = SimConfig(batch=sim_batch_settings(args)).batch_config()
    assert (batch.validating_s, batch.in_progress_s, batch.finalizing_s) == (0, 0.5, 0.1)
    assert batch.window_s == 30 and batch.error_rate == 0.2


def test_sim_batch_defaults_leave_no_window() -> None:
    batch = SimConfig(batch=sim_batch_settings(build_parser().parse_args(["sim"]))).batch_config()
    assert (batch.validating_s, batch.in_progress_s, batch.finalizing_s) == (1, 2, 1)
    assert batch.window_s is None and batch.error_rate == 0


def test_a_simulated_error_rate_past_one_is_refused() -> None:
    args = build_parser().parse_args(["sim", "--batch-error-rate", "2"])
    with pytest.raises(ValueError, match="error_rate"):
        SimConfig(batch=sim_batch_settings(args))


@pytest.mark.parametrize("command", ["run", "report out.parquet", "estimate", "status out.parquet"])
def test_an_unknown_flag_is_reported_by_its_subcommand(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as stop:
        parse_command_line([*command.split(), "--bogus"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    name = command.split()[0]
    assert f"usage: batcher {name} " in err
    assert f"batcher {name}: error: unrecognized arguments: --bogus" in err
