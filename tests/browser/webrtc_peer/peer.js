/*
 * A Hivewire peer written for a standard browser from docs/protocol.md alone, to prove that a standard
 * WebRTC stack interoperates with the volunteer client (issue 8, "Interoperability").
 *
 * It speaks: the signaling WebSocket (auth, welcome, heartbeats, signal envelopes); signed offers and
 * answers, verified as hivewire/signaling/signed.py verifies them (peer certificate against the server's
 * JWKS, claims, Ed25519 signature with WebCrypto, signed fingerprints equal to the SDP's, timestamp window,
 * nonce replay); the mesh link's two pre-negotiated data channels (stream 0 control: msgpack records,
 * stream 1 bulk: 20-byte framing with a SHA-256 per payload and credit through bulk_release).
 *
 * The test drives it through `window.hivewire` (see tests/browser/webrtc_peer/interop.py). Everything the
 * network hands it is checked before use: sizes before allocation, record schemas, signatures.
 */
"use strict";

(() => {
  // -- protocol constants (docs/protocol.md) -----------------------------------------------------------
  const SIGNAL_DOMAIN = "hivewire-signal-v1";
  const CERTIFICATE_TYPE = "hivewire-peer+jwt";
  const MAX_INCOMING_SIGNALING_BYTES = 128 * 1024; // as hivewire/signaling/messages.py
  const MAX_SDP_BYTES = 64 * 1024;
  const MAX_CERTIFICATE_BYTES = 4096;
  const MAX_FINGERPRINTS = 8;
  const TIMESTAMP_WINDOW_S = 60;
  const NONCE_WINDOW_S = 120;
  const CLOCK_SKEW_S = 30;
  const DIGEST_LENGTHS = { "sha-1": 20, "sha-224": 28, "sha-256": 32, "sha-384": 48, "sha-512": 64 };
  const PEER_ID = /^p[a-z2-7]{24}$/;

  const CONTROL_CHANNEL_ID = 0;
  const BULK_CHANNEL_ID = 1;
  const MAX_CONTROL_RECORD_BYTES = 64 * 1024;
  const MAX_UINT63 = 2n ** 63n - 1n;
  const KEEPALIVE_INTERVAL_MS = 5000;

  const FRAMING_VERSION = 1;
  const KIND_START = 1;
  const KIND_CHUNK = 2;
  const HEADER_BYTES = 20;
  const DIGEST_BYTES = 32;
  const MAX_MESSAGE_BYTES = 262144; // the largest frame either side sends (aiortc's a=max-message-size)
  const MAX_PAYLOAD_BYTES = 256 * 2 ** 20;
  const MAX_INCOMING_PAYLOADS = 4;
  const BUFFER_HIGH_BYTES = 1 * 2 ** 20;
  const BUFFER_LOW_BYTES = 256 * 2 ** 10;
  const GATHER_TIMEOUT_MS = 10000;
  // The test runs every process in a network namespace where only loopback exists; candidates for any
  // other address are dropped from our descriptions all the same, so none is ever offered to the peer.
  const ALLOWED_CANDIDATE_ADDRESS = "127.0.0.1";

  // -- small helpers -------------------------------------------------------------------------------------
  const encoder = new TextEncoder();
  const decoder = new TextDecoder("utf-8", { fatal: true });

  class Refused extends Error {
    constructor(check, detail) {
      super(`${check}: ${detail}`);
      this.check = check;
    }
  }

  function log(...parts) {
    const line = `${new Date().toISOString()} ${parts.join(" ")}`;
    state.log.push(line);
    if (state.log.length > 500) state.log.shift();
    const pre = document.getElementById("log");
    if (pre) pre.textContent = state.log.slice(-40).join("\n");
  }

  function withTimeout(promise, ms, what) {
    let timer;
    const timeout = new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`${what} did not happen within ${ms} ms`)), ms);
    });
    return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
  }

  function b64urlDecode(text, what) {
    if (typeof text !== "string" || !/^[A-Za-z0-9_-]*$/.test(text) || text.length % 4 === 1) {
      throw new Refused("payload", `${what} is not base64url`);
    }
    const binary = atob(text.replace(/-/g, "+").replace(/_/g, "/") + "==".slice(0, (4 - (text.length % 4)) % 4));
    return Uint8Array.from(binary, (c) => c.charCodeAt(0));
  }

  function b64urlEncode(bytes) {
    let binary = "";
    for (const byte of bytes) binary += String.fromCharCode(byte);
    return btoa(binary).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
  }

  function hex(bytes) {
    return Array.from(bytes, (b) => b.toString(16).padStart(2, "0")).join("");
  }

  function base32(bytes) {
    const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZ234567";
    let bits = 0;
    let value = 0;
    let out = "";
    for (const byte of bytes) {
      value = (value << 8) | byte;
      bits += 8;
      while (bits >= 5) {
        out += alphabet[(value >>> (bits - 5)) & 31];
        bits -= 5;
      }
    }
    if (bits > 0) out += alphabet[(value << (5 - bits)) & 31];
    return out;
  }

  async function sha256(bytes) {
    return new Uint8Array(await crypto.subtle.digest("SHA-256", bytes));
  }

  async function peerIdFromKey(raw) {
    return "p" + base32(await sha256(raw)).slice(0, 24).toLowerCase();
  }

  function parseObject(bytes, what) {
    let value;
    try {
      value = JSON.parse(decoder.decode(bytes));
    } catch (error) {
      throw new Refused("certificate", `${what} is not JSON: ${error.message}`);
    }
    if (value === null || typeof value !== "object" || Array.isArray(value)) {
      throw new Refused("certificate", `${what} is not a JSON object`);
    }
    return value;
  }

  function isInteger(value) {
    return typeof value === "number" && Number.isSafeInteger(value);
  }

  function bytesEqual(a, b) {
    return a.length === b.length && a.every((byte, i) => byte === b[i]);
  }

  // -- signed descriptions (docs/protocol.md, "Signed offers and answers") -------------------------------

  // As Python's str.splitlines, which aiortc uses: a fingerprint hidden behind another line break would
  // otherwise escape the check.
  const LINE_BREAKS = /\r\n|[\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029]/;
  const FINGERPRINT_LINE = /^a=fingerprint:([A-Za-z0-9-]+) ((?:[0-9A-Fa-f]{2}:)*[0-9A-Fa-f]{2})$/;
  const SIGNED_FINGERPRINT = /^(sha-1|sha-224|sha-256|sha-384|sha-512) [0-9A-F]{2}(:[0-9A-F]{2}){19,63}$/;
  const SIGNED_FIELDS = ["certificate", "fingerprints", "nonce", "sdp", "signature", "timestamp"];

  function fingerprintsFromSdp(sdp) {
    const found = new Set();
    sdp.split(LINE_BREAKS).forEach((line, index) => {
      if (!line.toLowerCase().startsWith("a=fingerprint")) return;
      const match = FINGERPRINT_LINE.exec(line);
      const algorithm = match ? match[1].toLowerCase() : null;
      const digest = match ? match[2].toUpperCase() : null;
      if (!match || !(algorithm in DIGEST_LENGTHS) || digest.split(":").length !== DIGEST_LENGTHS[algorithm]) {
        throw new Refused("fingerprints", `SDP line ${index + 1} is a malformed fingerprint`);
      }
      found.add(`${algorithm} ${digest}`);
    });
    if (found.size === 0) throw new Refused("fingerprints", "the SDP carries no a=fingerprint line");
    return [...found].sort();
  }

  function canonical(sender, receiver, kind, fingerprints, nonce, timestamp) {
    const fields = [SIGNAL_DOMAIN, sender, receiver, kind, [...fingerprints].sort().join(","), nonce, String(timestamp)];
    return encoder.encode(fields.join("\n"));
  }

  function parseSigned(payload) {
    if (payload === null || typeof payload !== "object" || Array.isArray(payload)) {
      throw new Refused("payload", "expected a JSON object");
    }
    const keys = Object.keys(payload).sort();
    if (keys.join() !== SIGNED_FIELDS.join()) {
      throw new Refused("payload", `fields ${JSON.stringify(keys)}, expected exactly ${JSON.stringify(SIGNED_FIELDS)}`);
    }
    const { sdp, certificate, fingerprints, nonce, timestamp, signature } = payload;
    if (typeof sdp !== "string" || sdp.length === 0 || encoder.encode(sdp).length > MAX_SDP_BYTES) {
      throw new Refused("payload", `sdp must be a string of 1 to ${MAX_SDP_BYTES} bytes`);
    }
    if (typeof certificate !== "string" || certificate.length === 0 || certificate.length > MAX_CERTIFICATE_BYTES) {
      throw new Refused("payload", `certificate must be a string of 1 to ${MAX_CERTIFICATE_BYTES} characters`);
    }
    if (
      !Array.isArray(fingerprints) ||
      fingerprints.length < 1 ||
      fingerprints.length > MAX_FINGERPRINTS ||
      !fingerprints.every((f) => typeof f === "string" && SIGNED_FINGERPRINT.test(f))
    ) {
      throw new Refused("payload", `fingerprints must list 1 to ${MAX_FINGERPRINTS} "algo HEX:..." strings`);
    }
    if (typeof nonce !== "string" || !/^[A-Za-z0-9_-]{22}$/.test(nonce)) {
      throw new Refused("payload", "nonce must be 22 base64url characters");
    }
    if (!isInteger(timestamp) || timestamp < 0 || timestamp > 2 ** 40) {
      throw new Refused("payload", "timestamp must be an integer in 0..2^40");
    }
    if (typeof signature !== "string" || !/^[A-Za-z0-9_-]{86}$/.test(signature)) {
      throw new Refused("payload", "signature must be 86 base64url characters");
    }
    return { sdp, certificate, fingerprints, nonce, timestamp, signature };
  }

  async function verifyCertificate(token) {
    if (!/^[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+$/.test(token)) {
      throw new Refused("certificate", "malformed JWT");
    }
    const [headerPart, claimsPart, signaturePart] = token.split(".");
    const header = parseObject(b64urlDecode(headerPart, "JWT header"), "JWT header");
    if (header.alg !== "EdDSA") throw new Refused("certificate", `algorithm must be EdDSA, got ${header.alg}`);
    if (header.typ !== CERTIFICATE_TYPE) throw new Refused("certificate", `type must be ${CERTIFICATE_TYPE}`);
    const jwk = state.config.jwks.keys.find(
      (key) => key.kid === header.kid && key.kty === "OKP" && key.crv === "Ed25519" && typeof key.x === "string",
    );
    if (!jwk) throw new Refused("certificate", `signed by unknown key ${JSON.stringify(header.kid)}`);
    const serverKey = await crypto.subtle.importKey(
      "jwk", { kty: "OKP", crv: "Ed25519", x: jwk.x }, { name: "Ed25519" }, false, ["verify"],
    );
    const signed = encoder.encode(`${headerPart}.${claimsPart}`);
    const jwtSignature = b64urlDecode(signaturePart, "JWT signature");
    if (!(await crypto.subtle.verify({ name: "Ed25519" }, serverKey, jwtSignature, signed))) {
      throw new Refused("certificate", "bad signature");
    }
    const claims = parseObject(b64urlDecode(claimsPart, "JWT claims"), "JWT claims");
    const now = Date.now() / 1000;
    if (claims.iss !== state.config.issuer) throw new Refused("certificate", `issued by ${claims.iss}`);
    if (claims.run !== state.config.run) throw new Refused("certificate", `issued for run ${claims.run}`);
    if (typeof claims.sub !== "string" || !/^[1-9][0-9]{0,18}$/.test(claims.sub)) {
      throw new Refused("certificate", "subject must be a positive decimal user id");
    }
    if (typeof claims.jti !== "string" || !/^[A-Za-z0-9_-]{22,128}$/.test(claims.jti)) {
      throw new Refused("certificate", "jti must be 22 to 128 base64url characters");
    }
    if (!isInteger(claims.iat) || !isInteger(claims.exp) || claims.exp <= claims.iat) {
      throw new Refused("certificate", "iat and exp must be integers, exp after iat");
    }
    if (claims.iat > now + CLOCK_SKEW_S) throw new Refused("certificate", "issued in the future");
    if (claims.exp + CLOCK_SKEW_S <= now) throw new Refused("certificate", "expired");
    const peerKey = typeof claims.peer_key === "string" && /^[A-Za-z0-9_-]{43}$/.test(claims.peer_key)
      ? b64urlDecode(claims.peer_key, "peer_key") : null;
    if (!peerKey || peerKey.length !== 32 || b64urlEncode(peerKey) !== claims.peer_key) {
      throw new Refused("certificate", "peer_key must be 32 bytes of canonical base64url");
    }
    if (typeof claims.peer_id !== "string" || claims.peer_id !== (await peerIdFromKey(peerKey))) {
      throw new Refused("certificate", "peer_id is not derived from peer_key");
    }
    return { peerId: claims.peer_id, peerKey };
  }

  // The checks of DescriptionVerifier.verify, in its order: cheap ones first, the nonce remembered last.
  async function verifyDescription(sender, kind, payload) {
    if (kind !== "offer" && kind !== "answer") throw new Refused("kind", `${kind} is not a signed kind`);
    const signed = parseSigned(payload);
    const now = Date.now() / 1000;
    if (Math.abs(signed.timestamp - now) > TIMESTAMP_WINDOW_S) {
      throw new Refused("timestamp", `signed ${Math.round(signed.timestamp - now)} s from our clock`);
    }
    if (new Set(signed.fingerprints).size !== signed.fingerprints.length) {
      throw new Refused("fingerprints", "a fingerprint is listed twice");
    }
    const inSdp = fingerprintsFromSdp(signed.sdp);
    if (inSdp.join() !== [...signed.fingerprints].sort().join()) {
      throw new Refused("fingerprints", `the SDP carries ${inSdp}, but ${signed.fingerprints} were signed`);
    }
    const certificate = await verifyCertificate(signed.certificate);
    if (certificate.peerId !== sender) {
      throw new Refused("sender", `${kind} from ${sender} carries the certificate of ${certificate.peerId}`);
    }
    const peerKey = await crypto.subtle.importKey("raw", certificate.peerKey, { name: "Ed25519" }, false, ["verify"]);
    const message = canonical(sender, state.peerId, kind, signed.fingerprints, signed.nonce, signed.timestamp);
    const signature = b64urlDecode(signed.signature, "signature");
    if (signature.length !== 64 || !(await crypto.subtle.verify({ name: "Ed25519" }, peerKey, signature, message))) {
      throw new Refused("signature", `${kind} from ${sender}: the signature does not verify`);
    }
    for (const [nonce, seen] of state.nonces) {
      if (seen <= now - NONCE_WINDOW_S) state.nonces.delete(nonce);
    }
    if (state.nonces.has(signed.nonce)) throw new Refused("replay", `nonce ${signed.nonce} was already used`);
    state.nonces.set(signed.nonce, now);
    return signed.sdp;
  }

  async function signDescription(receiver, kind, sdp) {
    const fingerprints = fingerprintsFromSdp(sdp);
    const nonce = b64urlEncode(crypto.getRandomValues(new Uint8Array(16)));
    const timestamp = Math.floor(Date.now() / 1000);
    const message = canonical(state.peerId, receiver, kind, fingerprints, nonce, timestamp);
    const signature = new Uint8Array(await crypto.subtle.sign({ name: "Ed25519" }, state.privateKey, message));
    return { sdp, certificate: state.config.certificate, fingerprints, nonce, timestamp, signature: b64urlEncode(signature) };
  }

  // Keeps only candidates on the allowed address, and says which others the browser had gathered.
  function loopbackOnly(sdp) {
    const kept = [];
    for (const line of sdp.split("\r\n")) {
      if (line.startsWith("a=candidate:")) {
        const address = line.split(" ")[4];
        state.gatheredCandidates.push(line);
        if (address !== ALLOWED_CANDIDATE_ADDRESS) {
          state.droppedCandidates.push(address);
          continue;
        }
        state.sentCandidates.push(address);
      }
      kept.push(line);
    }
    return kept.join("\r\n");
  }

  // -- msgpack, the subset control records use ----------------------------------------------------------

  function packRecord(record) {
    const parts = [];
    const byte = (...values) => parts.push(Uint8Array.from(values));
    const packString = (text) => {
      const bytes = encoder.encode(text);
      if (bytes.length < 32) byte(0xa0 | bytes.length);
      else if (bytes.length < 256) byte(0xd9, bytes.length);
      else byte(0xda, bytes.length >> 8, bytes.length & 0xff);
      parts.push(bytes);
    };
    const packUint = (value) => {
      const big = BigInt(value);
      if (big < 0n || big > MAX_UINT63) throw new Error(`${value} is outside 0..2^63-1`);
      if (big < 128n) return byte(Number(big));
      const out = new Uint8Array(9);
      out[0] = 0xcf;
      new DataView(out.buffer).setBigUint64(1, big);
      parts.push(out);
    };
    const entries = Object.entries(record);
    byte(0x80 | entries.length);
    for (const [key, value] of entries) {
      packString(key);
      if (typeof value === "string") packString(value);
      else packUint(value);
    }
    const total = parts.reduce((sum, part) => sum + part.length, 0);
    const out = new Uint8Array(total);
    let offset = 0;
    for (const part of parts) {
      out.set(part, offset);
      offset += part.length;
    }
    return out;
  }

  function unpackRecord(buffer) {
    if (!(buffer instanceof ArrayBuffer)) throw new Error("expected a binary msgpack record");
    if (buffer.byteLength > MAX_CONTROL_RECORD_BYTES) throw new Error(`record of ${buffer.byteLength} bytes`);
    const view = new DataView(buffer);
    const bytes = new Uint8Array(buffer);
    let at = 0;
    const need = (n) => {
      if (at + n > bytes.length) throw new Error("truncated msgpack");
    };
    const take = (n) => {
      need(n);
      const start = at;
      at += n;
      return start;
    };
    const count = (n) => {
      // Every element takes at least one byte: a declared count beyond the bytes left is refused unread.
      if (n > bytes.length - at) throw new Error("msgpack count exceeds the record");
      return n;
    };
    const string = (n) => decoder.decode(bytes.subarray(take(n), at));
    const uint64 = () => {
      const value = view.getBigUint64(take(8));
      return value <= BigInt(Number.MAX_SAFE_INTEGER) ? Number(value) : value;
    };
    const value = (depth) => {
      if (depth > 8) throw new Error("msgpack nested too deeply");
      const tag = bytes[take(1)];
      if (tag <= 0x7f) return tag;
      if (tag >= 0xe0) return tag - 0x100;
      if ((tag & 0xf0) === 0x80) return map(count(tag & 0x0f), depth);
      if ((tag & 0xf0) === 0x90) return array(count(tag & 0x0f), depth);
      if ((tag & 0xe0) === 0xa0) return string(tag & 0x1f);
      switch (tag) {
        case 0xc0: return null;
        case 0xc2: return false;
        case 0xc3: return true;
        case 0xc4: return bytes.slice(take(view.getUint8(take(1))), at);
        case 0xc5: return bytes.slice(take(view.getUint16(take(2))), at);
        case 0xca: return view.getFloat32(take(4));
        case 0xcb: return view.getFloat64(take(8));
        case 0xcc: return view.getUint8(take(1));
        case 0xcd: return view.getUint16(take(2));
        case 0xce: return view.getUint32(take(4));
        case 0xcf: return uint64();
        case 0xd0: return view.getInt8(take(1));
        case 0xd1: return view.getInt16(take(2));
        case 0xd2: return view.getInt32(take(4));
        case 0xd9: return string(view.getUint8(take(1)));
        case 0xda: return string(view.getUint16(take(2)));
        case 0xdc: return array(count(view.getUint16(take(2))), depth);
        case 0xde: return map(count(view.getUint16(take(2))), depth);
        default: throw new Error(`msgpack type 0x${tag.toString(16)} is not used by control records`);
      }
    };
    const array = (n, depth) => Array.from({ length: n }, () => value(depth + 1));
    const map = (n, depth) => {
      const out = new Map();
      for (let i = 0; i < n; i++) {
        const key = value(depth + 1);
        if (typeof key !== "string") throw new Error("msgpack map key is not a string");
        out.set(key, value(depth + 1));
      }
      return out;
    };
    const record = value(0);
    if (at !== bytes.length) throw new Error("trailing bytes after the record");
    if (!(record instanceof Map) || typeof record.get("type") !== "string") throw new Error("not a typed record");
    return record;
  }

  // Exact field sets of the records this peer acts on (hivewire/mesh/control.py, relay.py); others are
  // counted and ignored, as a peer that does not take part in gossip or relaying may.
  const UINT = (v) => (typeof v === "number" && Number.isSafeInteger(v) && v >= 0) || (typeof v === "bigint" && v <= MAX_UINT63);
  const SCHEMAS = {
    ping: { nonce: UINT },
    pong: { nonce: UINT },
    bulk_release: { payload_id: UINT },
    bulk_refused: { payload_id: UINT, reason: (v) => typeof v === "string" },
    neighbours: { peers: (v) => Array.isArray(v) && v.length <= 64 && v.every((p) => typeof p === "string" && PEER_ID.test(p)) },
  };

  function checkRecord(record) {
    const schema = SCHEMAS[record.get("type")];
    if (!schema) return false;
    const fields = [...record.keys()].filter((k) => k !== "type").sort();
    if (fields.join() !== Object.keys(schema).sort().join()) throw new Error(`${record.get("type")}: fields ${fields}`);
    for (const [name, check] of Object.entries(schema)) {
      if (!check(record.get(name))) throw new Error(`${record.get("type")}.${name} has the wrong type or range`);
    }
    return true;
  }

  // -- the link: two pre-negotiated channels -------------------------------------------------------------

  function header(kind, payloadId, value) {
    const frame = new Uint8Array(HEADER_BYTES);
    const view = new DataView(frame.buffer);
    view.setUint8(0, FRAMING_VERSION);
    view.setUint8(1, kind);
    view.setUint16(2, 0);
    view.setBigUint64(4, BigInt(payloadId));
    view.setBigUint64(12, BigInt(value));
    return frame;
  }

  function joinBytes(head, body) {
    const frame = new Uint8Array(head.length + body.length);
    frame.set(head);
    frame.set(body, head.length);
    return frame;
  }

  class Link {
    constructor(peer) {
      this.peer = peer;
      this.pc = new RTCPeerConnection({ iceServers: state.config.ice_servers });
      this.control = this.pc.createDataChannel("hivewire-control", { negotiated: true, id: CONTROL_CHANNEL_ID });
      this.bulk = this.pc.createDataChannel("hivewire-bulk", { negotiated: true, id: BULK_CHANNEL_ID });
      for (const channel of [this.control, this.bulk]) {
        channel.binaryType = "arraybuffer";
        channel.onopen = () => this.checkOpen();
        channel.onclose = () => log(`${channel.label} closed`);
      }
      this.bulk.bufferedAmountLowThreshold = BUFFER_LOW_BYTES;
      this.control.onmessage = (event) => this.onControl(event.data);
      this.bulk.onmessage = (event) => this.onBulk(event.data);
      this.opened = new Promise((resolve) => (this.resolveOpened = resolve));
      // Receiving (mirror of hivewire/mesh/framing.py PayloadDecoder).
      this.incoming = new Map();
      this.lastId = 0;
      this.unreleased = 0;
      // Sending.
      this.nextPayloadId = 1;
      this.sendTurn = Promise.resolve();
      this.outstanding = new Map(); // payload id -> {resolve} until bulk_release or bulk_refused
      this.creditWaiters = [];
      this.pingNonce = 0;
      this.keepalive = null;
    }

    checkOpen() {
      if (this.control.readyState === "open" && this.bulk.readyState === "open") {
        // The peer's limit for one message (its a=max-message-size), capped at what aiortc sends.
        this.maxFrameBytes = Math.min(this.pc.sctp.maxMessageSize || 65536, MAX_MESSAGE_BYTES);
        this.keepalive = setInterval(() => this.sendRecord({ type: "ping", nonce: ++this.pingNonce }), KEEPALIVE_INTERVAL_MS);
        log(`link to ${this.peer} open; frames up to ${this.maxFrameBytes} bytes`);
        this.resolveOpened({ peer: this.peer, max_frame_bytes: this.maxFrameBytes });
      }
    }

    close() {
      clearInterval(this.keepalive);
      this.pc.close();
    }

    sendRecord(record) {
      if (this.control.readyState !== "open") return;
      this.control.send(packRecord(record));
    }

    onControl(data) {
      let record;
      try {
        record = unpackRecord(data);
        if (!checkRecord(record)) {
          state.counters.records_ignored += 1;
          state.ignoredRecords.add(record.get("type"));
          return;
        }
      } catch (error) {
        state.counters.records_refused += 1;
        log(`refused a control record from ${this.peer}: ${error.message}`);
        return;
      }
      const type = record.get("type");
      if (type === "ping") this.sendRecord({ type: "pong", nonce: record.get("nonce") });
      else if (type === "bulk_release" || type === "bulk_refused") this.onRelease(record);
      else if (type === "neighbours") state.counters.neighbour_lists += 1;
    }

    onRelease(record) {
      const id = record.get("payload_id");
      const waiter = this.outstanding.get(id);
      if (!waiter) {
        state.counters.records_refused += 1;
        log(`${record.get("type")} for payload ${id}, which is not outstanding`);
        return;
      }
      this.outstanding.delete(id);
      this.creditWaiters.splice(0).forEach((wake) => wake());
      waiter.resolve(record.get("type") === "bulk_release" ? null : record.get("reason"));
    }

    refuseFrame(detail, payloadId) {
      state.counters.frames_refused += 1;
      state.refusedFrames.push(detail);
      state.wakeReceivers();
      log(`refused a bulk frame from ${this.peer}: ${detail}`);
      if (payloadId !== undefined) this.sendRecord({ type: "bulk_refused", payload_id: payloadId, reason: detail.slice(0, 300) });
    }

    onBulk(data) {
      if (!(data instanceof ArrayBuffer)) return this.refuseFrame(`expected a binary frame, got ${typeof data}`);
      if (data.byteLength < HEADER_BYTES) return this.refuseFrame(`truncated frame of ${data.byteLength} bytes`);
      if (data.byteLength > MAX_MESSAGE_BYTES) return this.refuseFrame(`frame of ${data.byteLength} bytes is too large`);
      const view = new DataView(data);
      const [version, kind, reserved] = [view.getUint8(0), view.getUint8(1), view.getUint16(2)];
      const bigId = view.getBigUint64(4);
      const value = view.getBigUint64(12);
      const body = new Uint8Array(data, HEADER_BYTES);
      if (version !== FRAMING_VERSION) return this.refuseFrame(`framing version ${version}`);
      if (reserved !== 0) return this.refuseFrame(`reserved header field is ${reserved}`);
      if (bigId < 1n || bigId > BigInt(Number.MAX_SAFE_INTEGER)) return this.refuseFrame(`payload id ${bigId} out of range`);
      const id = Number(bigId);
      if (kind === KIND_START) return this.onStart(id, value, body);
      if (kind === KIND_CHUNK) return this.onChunk(id, value, body);
      return this.refuseFrame(`unknown frame kind ${kind}`);
    }

    onStart(id, total, body) {
      if (body.length !== DIGEST_BYTES) return this.refuseFrame(`START body of ${body.length} bytes`);
      // Checked completely before the buffer is allocated.
      if (total > BigInt(MAX_PAYLOAD_BYTES)) return this.refuseFrame(`payload ${id} declares ${total} bytes`, id);
      if (id <= this.lastId) return this.refuseFrame(`payload id ${id} is a duplicate or replay`);
      if (this.incoming.size + this.unreleased >= MAX_INCOMING_PAYLOADS) {
        return this.refuseFrame(`payload ${id} refused, already holding ${MAX_INCOMING_PAYLOADS} payloads`, id);
      }
      this.lastId = id;
      this.incoming.set(id, { buffer: new Uint8Array(Number(total)), received: 0, digest: body.slice() });
      if (total === 0n) this.complete(id);
    }

    onChunk(id, offset, body) {
      const incoming = this.incoming.get(id);
      if (!incoming) return this.refuseFrame(`chunk for payload ${id}, which is not in progress`);
      let fault = null;
      if (body.length === 0) fault = "empty chunk";
      else if (offset !== BigInt(incoming.received)) fault = `chunk at offset ${offset}, expected ${incoming.received}`;
      else if (incoming.received + body.length > incoming.buffer.length) fault = "chunk overruns the declared size";
      if (fault) {
        this.incoming.delete(id);
        return this.refuseFrame(`payload ${id} discarded: ${fault}`, id);
      }
      incoming.buffer.set(body, incoming.received);
      incoming.received += body.length;
      if (incoming.received === incoming.buffer.length) this.complete(id);
    }

    async complete(id) {
      const incoming = this.incoming.get(id);
      this.incoming.delete(id);
      this.unreleased += 1; // holds its slot while hashing, as a delivered payload would
      const digest = await sha256(incoming.buffer);
      this.unreleased -= 1;
      if (!bytesEqual(digest, incoming.digest)) {
        return this.refuseFrame(`payload ${id} discarded: SHA-256 of the ${incoming.buffer.length} bytes differs`, id);
      }
      state.counters.payloads_received += 1;
      // Consumed at once: only its size and digest are kept for the test, then the credit goes back.
      state.received.push({ payload_id: id, size: incoming.buffer.length, sha256: hex(digest) });
      this.sendRecord({ type: "bulk_release", payload_id: id });
      state.wakeReceivers();
    }

    async waitCredit() {
      while (this.outstanding.size >= MAX_INCOMING_PAYLOADS) {
        await new Promise((wake) => this.creditWaiters.push(wake));
      }
    }

    async waitBuffer() {
      while (this.bulk.bufferedAmount > BUFFER_HIGH_BYTES) {
        await new Promise((wake) => this.bulk.addEventListener("bufferedamountlow", wake, { once: true }));
      }
    }

    // Sends one payload framed as framing.py does; resolves once the peer released or refused it.
    // Payloads are framed one at a time (ids must reach the peer in increasing order), but the next one
    // starts as soon as the previous one is in the channel: only credit limits how many are unreleased.
    async sendPayload(data, corruptAt) {
      const framed = this.sendTurn.then(() => this.frame(data, corruptAt));
      this.sendTurn = framed.catch(() => undefined);
      const { id, digest, released } = await framed;
      return { payload_id: id, size: data.length, sha256: hex(digest), refused: await released };
    }

    async frame(data, corruptAt) {
      await this.waitCredit();
      const id = this.nextPayloadId++;
      const digest = await sha256(data);
      const released = new Promise((resolve) => this.outstanding.set(id, { resolve }));
      this.bulk.send(joinBytes(header(KIND_START, id, data.length), digest));
      const step = this.maxFrameBytes - HEADER_BYTES;
      for (let offset = 0; offset < data.length; offset += step) {
        await this.waitBuffer();
        const body = data.slice(offset, offset + step);
        if (corruptAt !== undefined && corruptAt >= offset && corruptAt < offset + body.length) {
          body[corruptAt - offset] ^= 0xff; // after hashing: the receiver must notice
        }
        this.bulk.send(joinBytes(header(KIND_CHUNK, id, offset), body));
      }
      return { id, digest, released };
    }
  }

  // -- signaling -----------------------------------------------------------------------------------------

  function sendSignal(to, kind, payload) {
    const text = JSON.stringify({ type: "signal", to, kind, payload });
    const limit = state.welcome.limits.max_message_bytes;
    if (encoder.encode(text).length > limit) throw new Error(`a ${kind} of ${text.length} bytes exceeds ${limit}`);
    state.ws.send(text);
  }

  function onSignalingMessage(event) {
    if (
      typeof event.data !== "string" ||
      event.data.length > MAX_INCOMING_SIGNALING_BYTES ||
      encoder.encode(event.data).length > MAX_INCOMING_SIGNALING_BYTES
    ) {
      state.counters.signals_refused += 1;
      return log("dropped a signaling message: not text, or too large");
    }
    let message;
    try {
      message = JSON.parse(event.data);
    } catch {
      state.counters.signals_refused += 1;
      return log("dropped a signaling message: not JSON");
    }
    if (message === null || typeof message !== "object") return log("dropped a signaling message: not an object");
    if (message.type === "welcome") return state.onWelcome(message);
    if (message.type === "error") return log(`the server dropped a message of ours: ${message.code} ${message.detail}`);
    if (message.type !== "signal") return; // presence and peer samples: this peer waits to be offered a link
    if (!PEER_ID.test(message.from) || message.to !== state.peerId) {
      state.counters.signals_refused += 1;
      return log("dropped a signal with a malformed sender or for another peer");
    }
    if (message.kind === "offer") {
      state.signals = state.signals.then(() => onOffer(message.from, message.payload));
    } else if (message.kind === "answer") {
      state.signals = state.signals.then(() => onAnswer(message.from, message.payload));
    } else {
      log(`ignored a ${message.kind} from ${message.from}`); // no trickle ICE; a bye needs no action here
    }
  }

  // aiortc does no trickle ICE: a description it receives must carry every candidate.
  function gathered(pc) {
    const complete = new Promise((resolve) => {
      if (pc.iceGatheringState === "complete") return resolve();
      pc.addEventListener("icegatheringstatechange", () => pc.iceGatheringState === "complete" && resolve());
    });
    return withTimeout(complete, GATHER_TIMEOUT_MS, "ICE gathering");
  }

  function newLink(peer) {
    state.link = new Link(peer);
    state.wakeLinkWaiters();
    return state.link;
  }

  async function onOffer(sender, payload) {
    let sdp;
    try {
      sdp = await verifyDescription(sender, "offer", payload);
    } catch (error) {
      state.counters.signals_refused += 1;
      state.refusedSignals.push(error.check || "error");
      return log(`refused an offer from ${sender}: ${error.message}`);
    }
    if (state.link) {
      log(`${sender} offered a new link; replacing the one we hold`);
      state.link.close();
    }
    const link = newLink(sender);
    try {
      await link.pc.setRemoteDescription({ type: "offer", sdp });
      await link.pc.setLocalDescription(await link.pc.createAnswer());
      await gathered(link.pc);
      const answer = loopbackOnly(link.pc.localDescription.sdp);
      sendSignal(sender, "answer", await signDescription(sender, "answer", answer));
      log(`answered ${sender}`);
    } catch (error) {
      log(`could not answer ${sender}: ${error.message}`);
      state.errors.push(String(error.message));
    }
  }

  async function onAnswer(sender, payload) {
    const waiting = state.awaitingAnswer;
    if (!waiting || waiting.peer !== sender) return log(`dropped an answer from ${sender}: no offer of ours waits`);
    try {
      const sdp = await verifyDescription(sender, "answer", payload);
      state.awaitingAnswer = null;
      waiting.resolve(sdp);
    } catch (error) {
      state.counters.signals_refused += 1;
      state.refusedSignals.push(error.check || "error");
      log(`refused an answer from ${sender}: ${error.message}`);
    }
  }

  // Offers a new link to `peer`; resolves once both channels are open. Make before break: the old link
  // stays up until then (the peer drops its side when it accepts the offer).
  async function offer(peer) {
    const old = state.link;
    const link = newLink(peer);
    await link.pc.setLocalDescription(await link.pc.createOffer());
    await gathered(link.pc);
    const sdp = loopbackOnly(link.pc.localDescription.sdp);
    const answered = new Promise((resolve) => (state.awaitingAnswer = { peer, resolve }));
    sendSignal(peer, "offer", await signDescription(peer, "offer", sdp));
    log(`offered a link to ${peer}`);
    await link.pc.setRemoteDescription({ type: "answer", sdp: await answered });
    const opened = await link.opened;
    if (old) old.close();
    return opened;
  }

  // -- the test's handle ---------------------------------------------------------------------------------

  const state = {
    config: null,
    peerId: null,
    privateKey: null,
    ws: null,
    welcome: null,
    onWelcome: () => {},
    link: null,
    awaitingAnswer: null,
    signals: Promise.resolve(),
    nonces: new Map(),
    received: [],
    receiveWaiters: [],
    linkWaiters: [],
    refusedSignals: [],
    refusedFrames: [],
    ignoredRecords: new Set(),
    gatheredCandidates: [],
    droppedCandidates: [],
    sentCandidates: [],
    errors: [],
    log: [],
    counters: { signals_refused: 0, records_refused: 0, records_ignored: 0, frames_refused: 0, payloads_received: 0, neighbour_lists: 0 },
    wakeReceivers() {
      this.receiveWaiters.splice(0).forEach((wake) => wake());
    },
    wakeLinkWaiters() {
      this.linkWaiters.splice(0).forEach((wake) => wake());
    },
  };

  window.hivewire = {
    // Connects to signaling with the certificate and key the test hands over; resolves with the welcome.
    async start(config) {
      state.config = config;
      state.peerId = config.peer_id;
      state.privateKey = await crypto.subtle.importKey("jwk", config.private_jwk, { name: "Ed25519" }, false, ["sign"]);
      const welcomed = new Promise((resolve, reject) => {
        state.onWelcome = (message) => {
          state.onWelcome = () => log("ignored a second welcome");
          if (message.peer_id !== state.peerId) return reject(new Error(`welcomed as ${message.peer_id}`));
          state.welcome = message;
          const everyMs = Math.max(1000, message.heartbeat_seconds * 500);
          setInterval(() => state.ws.readyState === WebSocket.OPEN && state.ws.send('{"type":"heartbeat"}'), everyMs);
          resolve({ peer_id: message.peer_id, peers: message.peers });
        };
        state.ws = new WebSocket(config.signaling_url);
        state.ws.onopen = () => state.ws.send(JSON.stringify({ type: "auth", certificate: config.certificate }));
        state.ws.onmessage = onSignalingMessage;
        state.ws.onclose = (event) => {
          log(`signaling closed: ${event.code} ${event.reason}`);
          reject(new Error(`signaling closed: ${event.code} ${event.reason}`));
        };
      });
      return withTimeout(welcomed, 10000, "the signaling welcome");
    },

    async waitOpen(timeoutMs) {
      const linked = async () => {
        while (!state.link) await new Promise((wake) => state.linkWaiters.push(wake));
        return state.link.opened;
      };
      return withTimeout(linked(), timeoutMs, "an open link");
    },

    async offer(peer, timeoutMs) {
      return withTimeout(offer(peer), timeoutMs, `a link offered to ${peer}`);
    },

    // The next `count` verified payloads (size and SHA-256 of each), in arrival order.
    async receive(count, timeoutMs) {
      const enough = async () => {
        while (state.received.length < count) await new Promise((wake) => state.receiveWaiters.push(wake));
        return state.received.splice(0, count);
      };
      return withTimeout(enough(), timeoutMs, `${count} payloads`);
    },

    // Why the first `count` refused frames were refused (waits for them).
    async refusals(count, timeoutMs) {
      const enough = async () => {
        while (state.refusedFrames.length < count) await new Promise((wake) => state.receiveWaiters.push(wake));
        return state.refusedFrames.slice(0, count);
      };
      return withTimeout(enough(), timeoutMs, `${count} refused frames`);
    },

    // Sends payloads of random bytes of these sizes, one after the other; `corruptAt` flips one byte of
    // the last one after hashing.
    async send(sizes, timeoutMs, corruptAt) {
      const sendAll = async () => {
        const pending = [];
        for (const [index, size] of sizes.entries()) {
          const data = new Uint8Array(size);
          for (let at = 0; at < size; at += 65536) crypto.getRandomValues(data.subarray(at, Math.min(size, at + 65536)));
          pending.push(state.link.sendPayload(data, index === sizes.length - 1 ? corruptAt : undefined));
        }
        return Promise.all(pending);
      };
      return withTimeout(sendAll(), timeoutMs, `sending ${sizes.length} payloads`);
    },

    // What getStats says the link used: the selected pair's two ends, and every candidate either side had.
    async transport() {
      const stats = await state.link.pc.getStats();
      const candidate = (id) => {
        const entry = stats.get(id);
        return { address: entry.address, port: entry.port, type: entry.candidateType, protocol: entry.protocol };
      };
      let selected = null;
      const local = [];
      const remote = [];
      stats.forEach((entry) => {
        if (entry.type === "transport" && entry.selectedCandidatePairId) {
          const pair = stats.get(entry.selectedCandidatePairId);
          selected = {
            state: pair.state, // "in-progress" while a consent check is in flight: not a sign of trouble
            bytes_sent: pair.bytesSent,
            bytes_received: pair.bytesReceived,
            local: candidate(pair.localCandidateId),
            remote: candidate(pair.remoteCandidateId),
          };
        }
        if (entry.type === "local-candidate") local.push(entry.address);
        if (entry.type === "remote-candidate") remote.push(entry.address);
      });
      return { selected, local, remote, dropped: state.droppedCandidates, sent: state.sentCandidates };
    },

    report() {
      return {
        counters: state.counters,
        ignored_records: [...state.ignoredRecords].sort(),
        gathered_candidates: state.gatheredCandidates,
        refused_signals: state.refusedSignals,
        errors: state.errors,
        log: state.log,
      };
    },
  };
})();
