"""Parse the plain-text report `wyoming-bench stt|tts` prints (it has no machine-readable output)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

# The stat rows of a per-server block: "  Total (ms)       204.1     331.5 ..." (min, mean, median, p95, max).
_STAT_ROWS = {"TTFT (ms)": "ttft_ms", "Total (ms)": "total_ms", "RTF (x)": "rtf"}
_STAT_NAMES = ("min", "mean", "median", "p95", "max")
# wyoming-bench pads the server column of its summary tables to this width (reporting.SERVER_COL_WIDTH).
_SUMMARY_LABEL_WIDTH = 34

_VERSION = re.compile(r"^wyoming-bench (\S+) \((\w[\w-]*)\)$")
_ROUNDS = re.compile(r"^rounds:\s+(\d+)\s+warmup:\s+(\d+)")
_SERVER = re.compile(r"^Server: (\S+?):(\d+)(?: \((.*)\))?$")
_MODE = re.compile(r"^\[(\w+)\] ok=(\d+) fail=(\d+)$")
_STAT = re.compile(r"^  (TTFT \(ms\)|Total \(ms\)|RTF \(x\))\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s*$")
_AUDIO = re.compile(r"^  Audio\s+mean=([\d.]+)s(?: \(\d+ ms\), ([\d.]+) bytes| input)?")
_ACCURACY = re.compile(r"^  Accuracy\s+WER=(\S+)\s+CER=(\S+)\s+SAR=(\S+)")
_EDITS = re.compile(r"^\s+edits S=(\d+) I=(\d+) D=(\d+)\s+\(ref words=(\d+)\)")
_NOTE = re.compile(r"^  \[([\w-]+)\] (.*)$")
_NOTE_HOST = re.compile(r"\b(\S+?):(\d+)\b")
_SUMMARY_MODE = re.compile(r"^\[(\w+)\]$")


@dataclass
class Stats:
    """min / mean / median / p95 / max of one metric over a mode's successful measurements (None: n/a)."""

    min: float | None = None
    mean: float | None = None
    median: float | None = None
    p95: float | None = None
    max: float | None = None


@dataclass
class ModeResult:
    """One server's figures in one mode (non_streaming or streaming)."""

    ok: int = 0
    fail: int = 0
    ttft_ms: Stats | None = None
    total_ms: Stats | None = None
    rtf: Stats | None = None
    audio_s: float | None = None  # mean duration of the input (stt) or returned (tts) audio
    audio_bytes: float | None = None  # tts only
    wer: float | None = None  # stt only, fractions; the printed percentages have one decimal
    cer: float | None = None
    sar: float | None = None
    sub: int | None = None
    ins: int | None = None
    dels: int | None = None
    ref_words: int | None = None

    @property
    def wer_exact(self) -> float | None:
        """Pooled WER from the edit counts (exact, where the printed WER is rounded to 0.1 %)."""
        if self.ref_words and self.sub is not None and self.ins is not None and self.dels is not None:
            return (self.sub + self.ins + self.dels) / self.ref_words
        return self.wer


@dataclass
class ServerResult:
    """One benchmarked server (one program of it): its per-mode figures and what was said about it."""

    label: str
    host: str
    port: int
    program: str | None
    modes: dict[str, ModeResult] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


@dataclass
class Report:
    """A whole wyoming-bench run: per-server blocks (keyed by label), summary rows, notes."""

    version: str | None = None
    task: str | None = None
    rounds: int | None = None
    warmup: int | None = None
    servers: dict[str, ServerResult] = field(default_factory=dict)
    # mode -> server label -> column -> value (percent columns as fractions, "9.30s" as 9.3)
    summary: dict[str, dict[str, dict[str, float | None]]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    def by_port(self, port: int) -> ServerResult | None:
        """The result for the server listening on `port` (the first program, if it ran several)."""
        return next((s for s in self.servers.values() if s.port == port), None)

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready, with the exact WER beside the printed one."""
        out: dict[str, Any] = {"version": self.version, "task": self.task, "rounds": self.rounds,
                               "warmup": self.warmup, "summary": self.summary, "notes": self.notes, "servers": {}}
        for label, s in self.servers.items():
            modes = {}
            for name, m in s.modes.items():
                d = {k: (vars(v) if isinstance(v, Stats) else v) for k, v in vars(m).items()}
                d["wer_exact"] = m.wer_exact
                modes[name] = d
            out["servers"][label] = {"host": s.host, "port": s.port, "program": s.program, "modes": modes,
                                     "notes": s.notes}
        return out


def _num(cell: str) -> float | None:
    """'331.5' -> 331.5, '5.1%' -> 0.051, '9.30s' -> 9.3, 'n/a' -> None."""
    cell = cell.strip()
    if cell in ("n/a", ""):
        return None
    if cell.endswith("%"):
        return float(cell[:-1]) / 100.0
    return float(cell.rstrip("s"))


def _hosts(note: str) -> set[tuple[str, int]]:
    """The host:port pairs a note names."""
    return {(h, int(p)) for h, p in _NOTE_HOST.findall(note)}


def _parse_summary_row(line: str, columns: list[str]) -> tuple[str, dict[str, float | None]]:
    label = line[2:2 + _SUMMARY_LABEL_WIDTH].strip()
    cells = line[2 + _SUMMARY_LABEL_WIDTH:].split()
    row: dict[str, float | None] = {}
    for name, cell in zip(columns, cells):
        row[name] = _num(cell)
    return label, row


def parse_report(text: str) -> Report:
    """Parse everything wyoming-bench printed for `stt` or `tts` (unknown lines are skipped)."""
    rep = Report()
    server: ServerResult | None = None
    mode: ModeResult | None = None
    in_summary = False
    summary_mode: str | None = None
    columns: list[str] = []
    for line in text.splitlines():
        if m := _VERSION.match(line):
            rep.version, rep.task = m.group(1), m.group(2)
        elif m := _ROUNDS.match(line):
            rep.rounds, rep.warmup = int(m.group(1)), int(m.group(2))
        elif line.startswith("Summary (lower is better)"):
            in_summary, server, mode = True, None, None
        elif in_summary:
            if m := _SUMMARY_MODE.match(line):
                summary_mode, columns = m.group(1), []
                rep.summary[summary_mode] = {}
            elif summary_mode and line.startswith("  server "):
                columns = line.split()[1:]
            elif summary_mode and columns and line.startswith("  ") and line.strip():
                label, row = _parse_summary_row(line, columns)
                rep.summary[summary_mode][label] = row
        elif m := _SERVER.match(line):
            host, port, program = m.group(1), int(m.group(2)), m.group(3)
            label = line[len("Server: "):]
            server = ServerResult(label=label, host=host, port=port, program=program)
            # Notes printed under "=== label ===" before the block (a skipped mode) belong to it too.
            server.notes = [n for n in rep.notes if (host, port) in _hosts(n)]
            rep.servers[label] = server
            mode = None
        elif (m := _MODE.match(line)) and server is not None:
            mode = ModeResult(ok=int(m.group(2)), fail=int(m.group(3)))
            server.modes[m.group(1)] = mode
        elif (m := _STAT.match(line)) and mode is not None:
            values = [_num(c) for c in m.groups()[1:]]
            setattr(mode, _STAT_ROWS[m.group(1)], Stats(**dict(zip(_STAT_NAMES, values))))
        elif (m := _AUDIO.match(line)) and mode is not None:
            mode.audio_s = float(m.group(1))
            mode.audio_bytes = float(m.group(2)) if m.group(2) else None
        elif (m := _ACCURACY.match(line)) and mode is not None:
            mode.wer, mode.cer, mode.sar = (_num(g) for g in m.groups())
        elif (m := _EDITS.match(line)) and mode is not None:
            mode.sub, mode.ins, mode.dels, mode.ref_words = (int(g) for g in m.groups())
        elif m := _NOTE.match(line):
            note = f"[{m.group(1)}] {m.group(2)}"
            rep.notes.append(note)
            for s in rep.servers.values():
                if (s.host, s.port) in _hosts(note):
                    s.notes.append(note)
    return rep
