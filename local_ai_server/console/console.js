// The browser console: microphone -> AudioWorklet (24 kHz PCM16) -> the server's Realtime front at
// /v1/realtime; the spoken answer is played as it streams, and speaking over it interrupts it.
const RATE = 24000; // audio/pcm in both directions
const LOG_MAX = 60; // events kept in the log

const $ = (id) => document.getElementById(id);
const ui = {
  form: $("connect-form"), token: $("token"), button: $("connect"), status: $("status"),
  partial: $("partial"), transcript: $("transcript"), answer: $("answer"), turns: $("turns"),
  latency: $("latency"), bytes: $("audio-bytes"), bargeIns: $("barge-ins"), history: $("history"), log: $("log"),
};

let ws = null; // the Realtime connection
let ctx = null; // one AudioContext for capture and playback
let micStream = null;
let micNode = null;
let playhead = 0; // context time at which the next audio delta starts
let sources = []; // scheduled playback, stopped at once on a barge-in
let current = null; // id of the response in progress
const muted = new Set(); // responses cut by a barge-in: any late delta of theirs is dropped
let stoppedAt = null; // performance.now() at speech_stopped, until the first audio of the answer
let partialText = "";
const stats = { turns: 0, bytes: 0, bargeIns: 0 };

function setStatus(text, state) {
  ui.status.textContent = text;
  document.body.dataset.state = state;
}

function logEvent(type, detail = "", isError = false) {
  // Runs of the same event (audio deltas) fold into one line with a count.
  const last = ui.log.lastElementChild;
  if (last && last.dataset.type === type && !isError) {
    last.dataset.count = String(Number(last.dataset.count) + 1);
    last.textContent = `${type} ×${last.dataset.count}`;
  } else {
    const li = document.createElement("li");
    li.dataset.type = type;
    li.dataset.count = "1";
    li.textContent = detail ? `${type}: ${detail}` : type;
    if (isError) li.className = "error";
    ui.log.append(li);
    while (ui.log.children.length > LOG_MAX) ui.log.firstElementChild.remove();
  }
  ui.log.scrollTop = ui.log.scrollHeight;
}

function showStats() {
  ui.turns.textContent = String(stats.turns);
  ui.bytes.textContent = String(stats.bytes);
  ui.bargeIns.textContent = String(stats.bargeIns);
}

function send(event) {
  if (ws && ws.readyState === WebSocket.OPEN) ws.send(JSON.stringify(event));
}

function toBase64(buffer) {
  const bytes = new Uint8Array(buffer);
  let s = "";
  for (let i = 0; i < bytes.length; i++) s += String.fromCharCode(bytes[i]);
  return btoa(s);
}

// ------------------------------------------------------------------ playback

// Schedule one delta of PCM16 right after the previous one; returns its size in bytes.
function play(b64) {
  const raw = atob(b64);
  const view = new DataView(new ArrayBuffer(raw.length));
  for (let i = 0; i < raw.length; i++) view.setUint8(i, raw.charCodeAt(i));
  const n = raw.length >> 1;
  if (!n) return raw.length;
  const samples = new Float32Array(n);
  for (let i = 0; i < n; i++) samples[i] = view.getInt16(i * 2, true) / 32768;
  // A 24 kHz buffer in a context at another rate: Web Audio resamples it on playback.
  const buffer = ctx.createBuffer(1, n, RATE);
  buffer.copyToChannel(samples, 0);
  const src = ctx.createBufferSource();
  src.buffer = buffer;
  src.connect(ctx.destination);
  // Back to back with what is scheduled; a little ahead of now after a gap, so it does not start clipped.
  const at = Math.max(playhead, ctx.currentTime + 0.03);
  src.start(at);
  playhead = at + buffer.duration;
  sources.push(src);
  src.onended = () => { sources = sources.filter((s) => s !== src); };
  return raw.length;
}

function stopPlayback() {
  const wasPlaying = sources.length > 0;
  for (const src of sources) {
    try { src.stop(); } catch { /* already ended */ }
  }
  sources = [];
  playhead = 0;
  return wasPlaying;
}

// ------------------------------------------------------------------ microphone

async function startMic() {
  micStream = await navigator.mediaDevices.getUserMedia({
    audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
  });
  const source = ctx.createMediaStreamSource(micStream);
  // No outputs: the node is a sink that the context pulls by itself, and nothing of the mic is heard.
  micNode = new AudioWorkletNode(ctx, "pcm24k", { numberOfInputs: 1, numberOfOutputs: 0, channelCount: 1 });
  micNode.port.onmessage = (e) => send({ type: "input_audio_buffer.append", audio: toBase64(e.data) });
  source.connect(micNode);
}

function stopMic() {
  if (micNode) micNode.disconnect();
  if (micStream) micStream.getTracks().forEach((t) => t.stop());
  micNode = null;
  micStream = null;
}

// ------------------------------------------------------------------ server events

function onEvent(ev) {
  switch (ev.type) {
    case "session.created":
      send({
        type: "session.update",
        session: {
          type: "realtime",
          output_modalities: ["audio"],
          audio: {
            input: {
              format: { type: "audio/pcm", rate: RATE },
              turn_detection: { type: "server_vad", create_response: true, interrupt_response: true },
            },
            output: { format: { type: "audio/pcm", rate: RATE } },
          },
        },
      });
      break;
    case "session.updated":
      if (!micStream) {
        startMic().then(
          () => setStatus("Listening: speak.", "listening"),
          (err) => { setStatus(`Microphone refused: ${err.message}`, "error"); disconnect(); },
        );
      }
      break;
    case "input_audio_buffer.speech_started":
      // Barge-in: silence the answer now; the server cancels the response (interrupt_response).
      // output_audio_buffer.clear is not sent: it is for WebRTC/SIP, and this server refuses it.
      if (stopPlayback() || current) {
        stats.bargeIns++;
        if (current) muted.add(current);
      }
      partialText = "";
      ui.partial.textContent = "…";
      setStatus("Hearing you…", "hearing");
      break;
    case "input_audio_buffer.speech_stopped":
      stoppedAt = performance.now();
      setStatus("Thinking…", "thinking");
      break;
    case "conversation.item.input_audio_transcription.delta":
      partialText += ev.delta;
      ui.partial.textContent = partialText;
      break;
    case "conversation.item.input_audio_transcription.completed":
      ui.partial.textContent = "";
      ui.transcript.textContent = ev.transcript;
      break;
    case "response.created":
      current = ev.response.id;
      ui.answer.textContent = "";
      break;
    case "response.output_audio_transcript.delta":
    case "response.output_text.delta":
      if (!muted.has(ev.response_id)) ui.answer.textContent += ev.delta;
      break;
    case "response.output_audio.delta":
      if (muted.has(ev.response_id)) break;
      stats.bytes += play(ev.delta);
      if (stoppedAt !== null) {
        const ms = Math.round(performance.now() - stoppedAt);
        stoppedAt = null;
        ui.latency.textContent = `${ms} ms`;
        ui.latency.dataset.ms = String(ms);
        const li = document.createElement("li");
        li.textContent = `${ms} ms: ${ui.transcript.textContent}`;
        ui.history.append(li);
        setStatus("Answering (speak to interrupt)…", "answering");
      }
      showStats();
      break;
    case "response.done":
      if (ev.response.status === "completed") stats.turns++;
      if (current === ev.response.id) current = null;
      showStats();
      if (micStream) setStatus("Listening: speak.", "listening");
      break;
    case "error":
      logEvent("error", `${ev.error.code || ev.error.type}: ${ev.error.message}`, true);
      return;
    default:
      break;
  }
  const detail = ev.type.endsWith(".completed") ? ev.transcript : ev.type === "response.done" ? ev.response.status : "";
  logEvent(ev.type, detail);
}

// ------------------------------------------------------------------ connection

async function connect() {
  // Created and resumed inside the click: browsers start audio only after a user gesture.
  if (!ctx) {
    ctx = new AudioContext();
    await ctx.audioWorklet.addModule("/console/worklet.js");
  }
  await ctx.resume();
  const scheme = location.protocol === "https:" ? "wss" : "ws";
  const token = ui.token.value.trim(); // kept in this page's memory only
  // A browser cannot set an Authorization header on a WebSocket: the token goes as a subprotocol.
  const protocols = token ? ["realtime", `openai-insecure-api-key.${token}`] : ["realtime"];
  let opened = false;
  try {
    ws = new WebSocket(`${scheme}://${location.host}/v1/realtime?model=local`, protocols);
  } catch (err) {
    setStatus(`Cannot connect: ${err.message}`, "error");
    return;
  }
  setStatus("Connecting…", "connecting");
  ui.button.textContent = "Disconnect";
  ws.onopen = () => { opened = true; setStatus("Connected; setting up the session…", "connected"); };
  ws.onmessage = (e) => onEvent(JSON.parse(e.data));
  ws.onclose = (e) => {
    stopMic();
    stopPlayback();
    ws = null;
    current = null;
    ui.button.textContent = "Connect";
    setStatus(opened ? `Disconnected (${e.code}).` : "Could not connect: wrong token, or the server is down.",
      opened ? "closed" : "error");
  };
}

function disconnect() {
  if (ws) ws.close(1000);
}

ui.form.addEventListener("submit", (e) => {
  e.preventDefault();
  if (ws) disconnect();
  else connect().catch((err) => setStatus(`Error: ${err.message}`, "error"));
});
setStatus(ui.status.textContent, "idle");
