"""The Test tab: `liandan lora --test` on a run's adapter, with its report kept for the page."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from liandan.errors import LiandanError


@dataclass
class TestReport:
    lines: list[str] = field(default_factory=list)

    def find(self, pattern: str) -> re.Match | None:
        return next((m for m in map(re.compile(pattern).search, self.lines) if m), None)

    @property
    def exact(self) -> str | None:
        found = self.find(r"Exact answers: (\d+/\d+)")
        return found.group(1) if found else None

    @property
    def loss_and_perplexity(self) -> tuple[str, str] | None:
        found = self.find(r"Test loss (\d+\.?\d*|nan|inf), Test ppl (\d+\.?\d*|nan|inf)")
        return (found.group(1), found.group(2)) if found else None

    @property
    def retention(self) -> str | None:
        found = self.find(r"General knowledge kept: (\d+/\d+)")
        return found.group(1) if found else None


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
    run(cfg, log=lambda *parts: report.lines.extend(" ".join(map(str, parts)).splitlines()))
    return report
