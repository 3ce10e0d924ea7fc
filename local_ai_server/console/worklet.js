// Runs on the audio thread: the microphone at the context's rate -> 24 kHz PCM16, posted in 40 ms chunks.
const OUT_RATE = 24000;
const CHUNK = 960; // samples per message: 40 ms keeps messages few and latency low

class Pcm24k extends AudioWorkletProcessor {
  constructor() {
    super();
    this.step = sampleRate / OUT_RATE; // input samples per output sample (2 at 48 kHz)
    this.pos = 0; // input samples consumed since the last output sample, fractional
    this.sum = 0; // a box filter over those samples: a cheap low-pass before decimating
    this.count = 0;
    this.last = 0;
    this.out = new Int16Array(CHUNK);
    this.fill = 0;
  }

  process(inputs) {
    const input = inputs[0] && inputs[0][0];
    if (!input) return true; // nothing connected yet
    for (let i = 0; i < input.length; i++) {
      this.sum += input[i];
      this.count++;
      this.pos += 1;
      // More than one output per input sample only when the context runs below 24 kHz.
      while (this.pos >= this.step) {
        this.pos -= this.step;
        if (this.count) this.last = this.sum / this.count;
        this.sum = 0;
        this.count = 0;
        this.emit(this.last);
      }
    }
    return true;
  }

  emit(value) {
    const v = Math.max(-1, Math.min(1, value));
    this.out[this.fill++] = v < 0 ? v * 0x8000 : v * 0x7fff;
    if (this.fill === CHUNK) {
      this.port.postMessage(this.out.buffer, [this.out.buffer]); // transferred, not copied
      this.out = new Int16Array(CHUNK);
      this.fill = 0;
    }
  }
}

registerProcessor("pcm24k", Pcm24k);
