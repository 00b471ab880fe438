"""The Test tab: `liandan lora --test` on a run's adapter, with its report kept for the page."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from liandan.errors import LiandanError


@dataclass
class TestReport:
    lines: list[str] = field(default_factory=list)  # what the test printed, for the page's log
    scores: dict = field(default_factory=dict)  # lora.test_report's: test_loss, test_ppl, exact, total, retention_*

    @property
    def exact(self) -> str | None:
        return f"{self.scores['exact']}/{self.scores['total']}" if "exact" in self.scores else None

    @property
    def loss_and_perplexity(self) -> tuple[str, str] | None:
        if "test_loss" not in self.scores:
            return None
        return f"{self.scores['test_loss']:.3f}", f"{self.scores['test_ppl']:.3f}"

    @property
    def retention(self) -> str | None:
        if "retention_kept" not in self.scores:
            return None
        return f"{self.scores['retention_kept']}/{self.scores['retention_base']}"


def test_adapter(adapter_dir: Path, data_dir: Path, options: dict | None = None) -> TestReport:
    """Run the CLI's test step (lora.run with test=True) in this process; collect what it reports."""
    from liandan.config import load_config
    from liandan.lora import run

    if not (Path(data_dir) / "test.jsonl").is_file():
        raise LiandanError(f"{data_dir}: no test.jsonl to test on")
    options = options or {}
    cfg = load_config(None, {"test": True, "adapter_path": str(adapter_dir), "data": str(data_dir), "test_batches": -1,
                             "batch_size": options.get("batch_size"), "max_seq_length": options.get("max_seq_length")})
    report = TestReport()
    run(cfg, log=lambda *parts: report.lines.extend(" ".join(map(str, parts)).splitlines()), results=report.scores)
    return report
