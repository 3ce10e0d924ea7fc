"""The house's rules, checked: the call core and the front parsers import no socket, model or HTTP-client library."""

from __future__ import annotations

import subprocess
import sys

import pytest

FORBIDDEN = ("websockets", "faster_whisper", "ctranslate2", "llama_cpp", "piper", "onnxruntime", "openai")


@pytest.mark.parametrize("module", ["local_ai_server.voice.call", "local_ai_server.voice.listen",
                                    "local_ai_server.voice.turn", "local_ai_server.fronts.ava_render",
                                    "local_ai_server.fronts.wyoming_render", "local_ai_server.fronts.wyoming_wire",
                                    "local_ai_server.fronts.wyoming_audio", "local_ai_server.wyoming_uri",
                                    "local_ai_server.fronts.realtime_parse", "local_ai_server.fronts.realtime_render",
                                    "local_ai_server.fronts.realtime_input", "local_ai_server.fronts.realtime_tools",
                                    "local_ai_server.fronts.realtime_fields", "local_ai_server.fronts.realtime_respond",
                                    "local_ai_server.fronts.realtime_items",
                                    "local_ai_server.protocol", "local_ai_server.audio", "local_ai_server.text"])
def test_core_module_imports_no_socket_and_no_model_library(module: str) -> None:
    code = (f"import sys, {module}; "
            f"print(','.join(sorted({{m.split('.')[0] for m in sys.modules}} & set({FORBIDDEN!r}))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "", f"{module} pulls in {out.stdout.strip()}"
