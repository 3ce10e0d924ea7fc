"""Engine adapters: one small synchronous interface per stage (STT, LLM, TTS)."""
