// The stream page: polls /api/state (consoles, 2 Hz), takes the camera tiles' pictures as the viewer
// pushes them (/stream/..., MJPEG read with fetch, painted on canvases at the next animation frame), polls
// the other pictures (204 when unchanged), and draws the seed's layout. No interaction needed: it is meant
// for an OBS browser source. A tile shows a "waiting for ..." placeholder until its first picture or state
// arrives, and never an <img> without a successfully loaded picture behind it. What it paints (picture,
// when taken, when painted) goes back to the viewer once a second (/api/paints): /metrics and
// bench/viewer.py read the frame rate and latency people actually see from it.
"use strict";

(() => {
  const STATE_MS = 500; // consoles: 2 Hz
  const IMAGE_MS = 100; // pictures: 10 Hz at most
  const STALE_S = 5; // say so when a tile's source has been silent this long
  const ROLES = ["player", "trainer", "balancer", "judge"];
  const params = new URLSearchParams(location.search);
  const client = (params.get("client") || Math.random().toString(36).slice(2, 10)).slice(0, 64);
  const REPORT_MS = 1000; // paints back to the viewer
  const MAX_PAINTS = 1024; // paints waiting for the next report, at most (oldest dropped)
  let snap = null;

  const $ = (sel, root = document) => root.querySelector(sel);
  const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

  // -- fitting the 1920x1080 stage into the window ---------------------------------------------------

  function fit() {
    const stage = $("#stage");
    const s = Math.min(window.innerWidth / 1920, window.innerHeight / 1080) || 1;
    stage.style.transform = `scale(${s})`;
    stage.style.left = `${Math.max(0, (window.innerWidth - 1920 * s) / 2)}px`;
    stage.style.top = `${Math.max(0, (window.innerHeight - 1080 * s) / 2)}px`;
  }
  window.addEventListener("resize", fit);
  fit();

  // -- formatting --------------------------------------------------------------------------------------

  const esc = (v) =>
    String(v).replace(/[&<>"']/g, (c) => ({ "&": "&amp;", "<": "&lt;", ">": "&gt;", '"': "&quot;", "'": "&#39;" })[c]);
  const isNum = (v) => typeof v === "number" && Number.isFinite(v);
  const isMap = (v) => !!v && typeof v === "object" && !Array.isArray(v);

  function num(v, digits = 2) {
    if (!isNum(v)) return v === undefined || v === null ? "–" : esc(v);
    if (Number.isInteger(v) && Math.abs(v) < 1e15) return v.toLocaleString("en-US");
    const a = Math.abs(v);
    if (a !== 0 && (a < 1e-3 || a >= 1e6)) return v.toExponential(2);
    return v.toFixed(digits);
  }

  function signed(v, digits = 3) {
    return isNum(v) ? (v >= 0 ? "+" : "") + v.toFixed(digits) : num(v);
  }

  function short(v) {
    if (!isNum(v)) return num(v);
    const a = Math.abs(v);
    if (a >= 1e6) return (v / 1e6).toFixed(1) + "M";
    if (a >= 1e4) return (v / 1e3).toFixed(1) + "k";
    return num(v, 0);
  }

  function duration(s) {
    if (!isNum(s)) return "–";
    s = Math.max(0, s);
    if (s < 60) return `${Math.floor(s)}s`;
    if (s < 3600) return `${Math.floor(s / 60)}m ${Math.floor(s % 60)}s`;
    if (s < 86400) return `${Math.floor(s / 3600)}h ${Math.floor((s % 3600) / 60)}m`;
    return `${Math.floor(s / 86400)}d ${Math.floor((s % 86400) / 3600)}h`;
  }

  function dateText(unix) {
    if (!isNum(unix)) return "";
    const d = new Date(unix * 1000);
    const p = (n) => String(n).padStart(2, "0");
    return `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())} ${p(d.getHours())}:${p(d.getMinutes())}`;
  }

  function compact(v) {
    if (isNum(v)) return signed(v);
    if (Array.isArray(v)) return "[" + v.slice(0, 5).map((x) => (isNum(x) ? x.toFixed(2) : esc(x))).join(" ") + (v.length > 5 ? " …" : "") + "]";
    if (v && typeof v === "object") return esc(JSON.stringify(v).slice(0, 40));
    return num(v);
  }

  const row = (k, v) => `<div class="row"><span class="k">${esc(k)}</span><span class="v">${v}</span></div>`;

  // A bar for a value in [-1, 1] (from the middle) or [0, 1] (from the left).
  function bar(v, { centered = false, cls = "", wide = false } = {}) {
    let style = "width:0";
    if (isNum(v)) {
      const x = Math.max(-1, Math.min(1, v));
      if (centered) style = x >= 0 ? `left:50%;width:${x * 50}%` : `left:${50 + x * 50}%;width:${-x * 50}%`;
      else style = `left:0;width:${Math.max(0, x) * 100}%`;
    }
    return `<span class="bar${centered ? " centered" : ""}${wide ? " wide" : ""}"><i class="${cls}" style="${style}"></i></span>`;
  }

  // -- reading the snapshot ---------------------------------------------------------------------------

  function source(role) {
    const id = snap && snap.roles ? snap.roles[role] : null;
    const inst = id && snap.instances ? snap.instances[id] : null;
    return inst ? { id, ...inst, state: inst.state || {} } : null;
  }

  function ofService(service) {
    if (!snap || !snap.instances) return [];
    return Object.entries(snap.instances)
      .filter(([, v]) => v.service === service)
      .map(([id, v]) => ({ id, ...v, state: v.state || {} }));
  }

  function setStale(tile, src) {
    for (const el of tile.querySelectorAll(".stale")) {
      el.textContent = src && src.age_s > STALE_S ? `no update for ${duration(src.age_s)}` : "";
    }
  }

  function setPlaceholder(tile, text) {
    const el = $(".placeholder", tile);
    if (el.textContent !== text) el.textContent = text;
  }

  // -- pictures ----------------------------------------------------------------------------------------

  // Keeps one <img> showing the newest picture `name` of the instance that plays `role`.
  class Picture {
    constructor(img, role, name, { onChange = () => {}, everyMs = IMAGE_MS, when = () => true } = {}) {
      this.img = img;
      this.role = role;
      this.name = name;
      this.onChange = onChange;
      this.everyMs = everyMs;
      this.when = when;
      this.instance = null;
      this.seq = null;
      this.url = null;
      this.shown = false;
    }

    clear() {
      if (this.url) URL.revokeObjectURL(this.url);
      this.url = null;
      this.seq = null;
      this.instance = null;
      this.img.classList.remove("shown");
      this.img.removeAttribute("src");
      if (this.shown) {
        this.shown = false;
        this.onChange(false);
      }
    }

    async tick() {
      const src = source(this.role);
      if (!src || !src.images || !src.images[this.name] || !this.when()) {
        this.clear();
        return;
      }
      if (src.id !== this.instance) {
        this.clear();
        this.instance = src.id;
      }
      const url = `/img/${encodeURIComponent(src.id)}/${encodeURIComponent(this.name)}?have=${this.seq ?? ""}`;
      const r = await fetch(url, { cache: "no-store" });
      if (r.status !== 200) return; // 204: still the same picture; 404: gone since the state poll
      const seq = Number(r.headers.get("X-Seq"));
      const blobUrl = URL.createObjectURL(await r.blob());
      try {
        await new Promise((ok, fail) => {
          this.img.onload = ok;
          this.img.onerror = fail;
          this.img.src = blobUrl;
        });
      } catch {
        URL.revokeObjectURL(blobUrl); // undecodable: keep showing the previous picture
        if (this.url) this.img.src = this.url;
        return;
      }
      if (this.url) URL.revokeObjectURL(this.url);
      this.url = blobUrl;
      this.seq = seq;
      this.img.classList.add("shown");
      if (!this.shown) {
        this.shown = true;
        this.onChange(true);
      }
    }

    async run() {
      for (;;) {
        try {
          await this.tick();
        } catch {
          // the viewer restarting or the network hiccuping: try again next tick
        }
        await sleep(this.everyMs);
      }
    }
  }

  // -- pushed pictures ---------------------------------------------------------------------------------

  let paints = []; // [name, seq, taken_s, painted_s]: reported to the viewer once a second
  function painted(name, seq, taken) {
    if (paints.length >= MAX_PAINTS) paints.shift();
    paints.push([name, seq, taken, (performance.timeOrigin + performance.now()) / 1000]);
  }

  async function reportPaints() {
    for (;;) {
      await sleep(REPORT_MS);
      if (!paints.length) continue;
      const batch = paints;
      paints = [];
      try {
        await fetch("/api/paints", { method: "POST", body: JSON.stringify({ client, paints: batch }) });
      } catch {
        // the viewer restarting: these paints are lost, the next second's are not
      }
    }
  }

  const CRLF2 = [13, 10, 13, 10];
  function headerEnd(buf) {
    outer: for (let i = 0; i + 3 < buf.length; i++) {
      for (let k = 0; k < 4; k++) if (buf[i + k] !== CRLF2[k]) continue outer;
      return i;
    }
    return -1;
  }

  // One part of a multipart/x-mixed-replace stream off the front of buf: {headers, body, rest}, or null
  // while the part is still incomplete. The viewer writes Content-Length on every part.
  function takePart(buf) {
    const end = headerEnd(buf);
    if (end < 0) return null;
    const headers = {};
    for (const line of new TextDecoder("ascii").decode(buf.subarray(0, end)).split("\r\n")) {
      const at = line.indexOf(":");
      if (at > 0) headers[line.slice(0, at).trim().toLowerCase()] = line.slice(at + 1).trim();
    }
    const n = Number(headers["content-length"]);
    if (!Number.isFinite(n) || n < 0) throw new Error("a stream part without its length");
    if (buf.length < end + 4 + n + 2) return null;
    return { headers, body: buf.slice(end + 4, end + 4 + n), rest: buf.subarray(end + 4 + n + 2) };
  }

  // Keeps a <canvas> showing every picture `name` of the instance that plays `role`, as the viewer pushes
  // them. Pictures are decoded off the main thread (createImageBitmap) and painted at the next animation
  // frame; one overtaken by a newer before its frame is skipped, so the page never falls behind.
  class StreamPicture {
    constructor(canvas, role, name, { onChange = () => {} } = {}) {
      this.canvas = canvas;
      this.ctx = canvas.getContext("2d");
      this.role = role;
      this.name = name;
      this.onChange = onChange;
      this.shown = false;
      this.seq = -1; // newest decoded or painted
      this.next = null; // {bitmap, seq, taken} waiting for its animation frame
      this.skipped = 0;
    }

    want() {
      const src = source(this.role);
      return src && src.images && src.images[this.name] ? src.id : null;
    }

    clear() {
      if (this.next) this.next.bitmap.close();
      this.next = null;
      this.seq = -1;
      this.canvas.classList.remove("shown");
      if (this.shown) {
        this.shown = false;
        this.onChange(false);
      }
    }

    async run() {
      for (;;) {
        const id = this.want();
        if (!id) {
          this.clear();
          await sleep(STATE_MS);
          continue;
        }
        try {
          await this.follow(id);
        } catch {
          // the viewer restarting, or the instance gone: ask again
        }
        await sleep(250);
      }
    }

    // Read the stream of instance `id` until it ends or the tile should show someone else.
    async follow(id) {
      const ctl = new AbortController();
      const watch = setInterval(() => {
        if (this.want() !== id) ctl.abort();
      }, STATE_MS);
      try {
        const url = `/stream/${encodeURIComponent(id)}/${encodeURIComponent(this.name)}`;
        const r = await fetch(url, { cache: "no-store", signal: ctl.signal });
        if (!r.ok || !r.body) return;
        const reader = r.body.getReader();
        let buf = new Uint8Array(0);
        for (;;) {
          const { value, done } = await reader.read();
          if (done) return;
          const joined = new Uint8Array(buf.length + value.length);
          joined.set(buf);
          joined.set(value, buf.length);
          buf = joined;
          for (let part = takePart(buf); part; part = takePart(buf)) {
            buf = part.rest;
            this.decode(part.headers, part.body);
          }
        }
      } finally {
        clearInterval(watch);
        ctl.abort();
      }
    }

    async decode(headers, body) {
      const seq = Number(headers["x-seq"]);
      if (!(seq > this.seq)) return; // the newest again (the viewer's keep-alive), or overtaken
      this.seq = seq;
      let bitmap;
      try {
        bitmap = await createImageBitmap(new Blob([body], { type: headers["content-type"] || "image/jpeg" }));
      } catch {
        return; // undecodable: keep showing the previous picture
      }
      if (seq !== this.seq) {
        bitmap.close(); // a newer picture came in while this one decoded
        this.skipped += 1;
        return;
      }
      if (this.next) {
        this.next.bitmap.close();
        this.skipped += 1;
      } else {
        requestAnimationFrame(() => this.paint());
      }
      this.next = { bitmap, seq, taken: Number(headers["x-captured"]) || 0 };
    }

    paint() {
      const p = this.next;
      if (!p) return;
      this.next = null;
      if (this.canvas.width !== p.bitmap.width || this.canvas.height !== p.bitmap.height) {
        this.canvas.width = p.bitmap.width;
        this.canvas.height = p.bitmap.height;
      }
      this.ctx.drawImage(p.bitmap, 0, 0);
      p.bitmap.close();
      painted(this.name, p.seq, p.taken);
      this.canvas.classList.add("shown");
      if (!this.shown) {
        this.shown = true;
        this.onChange(true);
      }
    }
  }

  const cameraTiles = ["#tile-cinematic", "#tile-hood", "#tile-convcam"].map((sel) => {
    const tile = $(sel);
    const pic = new StreamPicture($("canvas", tile), tile.dataset.role, tile.dataset.image, {
      onChange: (on) => tile.classList.toggle("live", on),
    });
    return { tile, pic };
  });

  // -- the player console ------------------------------------------------------------------------------

  function renderCameras() {
    const p = source("player");
    for (const { tile, pic } of cameraTiles) {
      setStale(tile, p);
      if (!p) setPlaceholder(tile, "waiting for the player…");
      else if (!p.images || !p.images[pic.name]) setPlaceholder(tile, `waiting for the player's ${pic.name} picture…`);
    }
    const badge = $("#model-badge");
    const s = p ? p.state : {};
    if (p && s.model) {
      const age = isNum(s.model_created) ? snap.now - s.model_created : null;
      const created = isNum(s.model_created) ? `created ${dateText(s.model_created)} (${duration(age)} ago)` : "";
      const batch = isNum(s.model_batch) ? `batch ${num(s.model_batch)}` : "";
      // line and version apart (two versions of one line can stream at once), then batch and age
      const name = typeof s.model_line === "string" && isNum(s.model_version) && s.model_version > 0
        ? `${esc(s.model_line)} <span class="model-version">v${s.model_version}</span>`
        : esc(s.model);
      const follow = typeof s.follow === "string" && !s.follow.startsWith("newest") ? `pinned: ${s.follow}` : "";
      const html =
        `<div class="model-name">${name}</div>` +
        `<div class="model-meta">${[batch, created, follow].filter(Boolean).map(esc).join(" · ")}</div>`;
      if (badge.innerHTML !== html) badge.innerHTML = html;
    } else {
      const html = p ? `<div class="model-meta">no model yet</div>` : "";
      if (badge.innerHTML !== html) badge.innerHTML = html;
    }
  }

  function renderPlayer() {
    const tile = $("#tile-player");
    const p = source("player");
    setStale(tile, p);
    tile.classList.toggle("live", !!p);
    if (!p) {
      setPlaceholder(tile, "waiting for the player…");
      return;
    }
    const s = p.state;
    const raw = isMap(s.raw) ? s.raw : {};
    const c = isMap(s.controls) ? s.controls : {};
    const rawRows = Object.keys(raw).length
      ? Object.entries(raw)
          .map(([k, v]) => `<div class="row"><span class="k">${esc(k)}</span>${isNum(v) ? bar(v, { centered: true }) : ""}<span class="v">${compact(v)}</span></div>`)
          .join("")
      : `<div class="row"><span class="k">no prediction yet</span></div>`;
    const ctl = (k, v, opts) => `<div class="row"><span class="k">${k}</span>${bar(v, opts)}<span class="v">${isNum(v) ? v.toFixed(3) : "–"}</span></div>`;
    const age = isNum(s.model_created) ? duration(snap.now - s.model_created) : "–";
    const html =
      `<div class="cols">` +
      `<div class="col"><div class="head">Raw predictions</div>${rawRows}</div>` +
      `<div class="col"><div class="head">Controller</div>` +
      ctl("steering", c.steering, { centered: true }) +
      ctl("throttle", c.throttle, { cls: "throttle" }) +
      ctl("brake", c.brake, { cls: "brake" }) +
      `</div></div>` +
      `<div class="sep"></div>` +
      `<div class="grid2">` +
      row("FPS", num(s.fps, 1)) +
      row("PPS", num(s.pps, 1)) +
      `</div>` +
      row("Model", `<span class="ellipsis">${s.model ? esc(s.model) : "–"}</span>`) +
      `<div class="grid2">` +
      row("Batch", num(s.model_batch)) +
      row("Age", age) +
      row("Swaps", num(s.swaps)) +
      row("Unstucks", num(s.unstucks)) +
      row("Policy lag", isNum(s.policy_lag) ? num(s.policy_lag) : "–") +
      row("Instance", `<span class="ellipsis">${esc(p.id)}</span>`) +
      `</div>`;
    const body = $("#player-body");
    if (body.innerHTML !== html) body.innerHTML = html;
  }

  // -- the server/trainer console ----------------------------------------------------------------------

  const trainerBody = $("#trainer-body");
  trainerBody.innerHTML =
    `<div class="cols"><div class="col" id="trainer-text"></div>` +
    `<div class="balancer"><div class="head">Balancer</div><img id="hist-img" alt="balancer histogram">` +
    `<div class="none" id="hist-none">waiting for the balancer…</div><div id="balancer-text"></div></div></div>`;
  const histImg = $("#hist-img");
  histImg.style.display = "none";
  const histogram = new Picture(histImg, "balancer", "histogram", {
    everyMs: 1000, // the balancer redraws its histogram every few seconds
    onChange: (on) => {
      histImg.style.display = on ? "block" : "none";
      $("#hist-none").style.display = on ? "none" : "flex";
    },
  });

  function statusClass(status) {
    const s = String(status || "").toLowerCase();
    if (s.includes("train")) return "training";
    if (s.includes("wait") || s.includes("fill")) return "waiting";
    return "";
  }

  function renderTrainer() {
    const tile = $("#tile-trainer");
    const t = source("trainer");
    const b = source("balancer");
    const collectors = ofService("collector");
    setStale(tile, t);
    tile.classList.toggle("live", !!(t || b));
    if (!t && !b) {
      setPlaceholder(tile, "waiting for the trainer…");
      return;
    }
    const s = t ? t.state : {};
    const lines = [];
    if (t) {
      lines.push(row("Status", `<span class="status ${statusClass(s.status)}">${esc(s.status || "–")}</span>`));
      lines.push(`<div class="grid2">${row("Batch", num(s.batch))}${row("LR", isNum(s.lr) ? s.lr.toExponential(1) : "–")}</div>`);
      lines.push(`<div class="grid2">${row("Samples/s", num(s.samples_per_s, 1))}${row("Batches/s", num(s.batches_per_s, 2))}</div>`);
      const buffers = isMap(s.buffers) ? s.buffers : {};
      const loss = isMap(s.loss) ? s.loss : {};
      lines.push(`<div class="head">Buffers</div>`);
      const names = Object.keys(buffers);
      if (!names.length) lines.push(`<div class="row"><span class="k">none reported yet</span></div>`);
      for (const name of names) {
        const buf = isMap(buffers[name]) ? buffers[name] : {};
        const frac = isNum(buf.fill) && isNum(buf.capacity) && buf.capacity > 0 ? buf.fill / buf.capacity : null;
        lines.push(
          `<div class="row"><span class="k ellipsis" style="width:120px">${esc(name)}</span>` +
            bar(frac, { cls: frac !== null && frac >= 0.9 ? "full" : "" }) +
            `<span class="v">${short(buf.fill)}/${short(buf.capacity)}</span></div>`,
        );
      }
      const losses = Object.entries(loss).filter(([, v]) => isNum(v));
      if (losses.length) {
        lines.push(`<div class="head">Loss</div>`);
        for (const [k, v] of losses) lines.push(row(k, num(v, 4)));
      }
      lines.push(`<div class="sep"></div>`);
      const last = isNum(s.last_publish_batch) ? ` (batch ${num(s.last_publish_batch)})` : "";
      lines.push(row("Weight updates", `${num(s.published)}${last}`));
    }
    const ids = new Set([...(Array.isArray(s.collectors) ? s.collectors : []), ...collectors.map((c) => c.id)]);
    const sps = collectors.map((c) => c.state.sps).filter(isNum).reduce((a, x) => a + x, 0);
    const spsText = collectors.length ? ` · ${num(sps, 1)} samples/s` : "";
    lines.push(row("Collectors", `${ids.size}${spsText}`));
    const players = new Set([...(Array.isArray(s.players) ? s.players : []), ...ofService("player").map((p) => p.id)]);
    lines.push(row("Players", `<span class="ellipsis">${players.size}${players.size ? " · " + [...players].map(esc).join(", ") : ""}</span>`));
    if (!t) lines.unshift(row("Trainer", `<span class="status waiting">waiting…</span>`));
    const html = lines.join("");
    const text = $("#trainer-text");
    if (text.innerHTML !== html) text.innerHTML = html;

    const bs = b ? b.state : {};
    const bhtml = b
      ? row("accepted", num(bs.accepted)) + row("sets", num(bs.sets)) + row("acceptance", isNum(bs.acceptance) ? `${(bs.acceptance * 100).toFixed(1)}%` : "–")
      : "";
    const btext = $("#balancer-text");
    if (btext.innerHTML !== bhtml) btext.innerHTML = bhtml;
  }

  // -- the loss plot -----------------------------------------------------------------------------------

  const lossCanvas = $("#loss-canvas");
  const lossImg = $("#loss-img");
  const hasLossHistory = () => {
    const t = source("trainer");
    return !!(t && Array.isArray(t.state.loss_history) && t.state.loss_history.length);
  };
  // a trainer may send a server-rendered plot (image "loss") instead of loss_history
  const lossPicture = new Picture(lossImg, "trainer", "loss", { everyMs: 1000, when: () => !hasLossHistory() });

  // The judge's curve for the trainer's run (its console's curves: run -> [[batch, km/unstuck, on-road]]),
  // and the NPC's km between Unstucks on the same towns; null when there is no judge or no point yet.
  function judgeScore(trainer) {
    const j = source("judge");
    const curves = j && isMap(j.state.curves) ? j.state.curves : {};
    const run = trainer && typeof trainer.state.run === "string" ? trainer.state.run : null;
    const runs = Object.keys(curves);
    const key = run && curves[run] ? run : runs.length === 1 ? runs[0] : null;
    const pts = key && Array.isArray(curves[key]) ? curves[key].filter((p) => Array.isArray(p) && isNum(p[0]) && isNum(p[1])) : [];
    if (!pts.length) return null;
    const ref = isMap(j.state.reference) && isNum(j.state.reference.km_between_unstucks) ? j.state.reference.km_between_unstucks : null;
    return { run: key, pts, ref };
  }

  function drawLoss(points, score) {
    const ctx = lossCanvas.getContext("2d");
    const W = lossCanvas.width;
    const H = lossCanvas.height;
    // with a driving score: room for its axis at the right and its line of text at the top
    const m = { l: 64, r: score ? 44 : 26, t: score ? 46 : 30, b: 30 };
    ctx.fillStyle = "#0f1317";
    ctx.fillRect(0, 0, W, H);
    const xs = points.map((p) => p[0]);
    const ys = points.map((p) => p[1]);
    // TensorBoard's default: an exponential moving average over the raw curve, weight 0.6
    const smooth = [];
    let ema = null;
    for (const y of ys) {
      ema = ema === null ? y : ema * 0.6 + y * 0.4;
      smooth.push(ema);
    }
    const sx = score ? score.pts.map((p) => p[0]) : [];
    let x0 = Math.min(...xs, ...sx);
    let x1 = Math.max(...xs, ...sx);
    if (x1 === x0) x1 = x0 + 1;
    let y0 = Math.min(...ys);
    let y1 = Math.max(...ys);
    if (y1 - y0 < 1e-12) {
      y0 -= 0.5;
      y1 += 0.5;
    }
    const pad = (y1 - y0) * 0.06;
    y0 -= pad;
    y1 += pad;
    const px = (x) => m.l + ((x - x0) / (x1 - x0)) * (W - m.l - m.r);
    const py = (y) => H - m.b - ((y - y0) / (y1 - y0)) * (H - m.t - m.b);

    ctx.font = "12px 'DejaVu Sans Mono', monospace";
    ctx.strokeStyle = "#262c35";
    ctx.fillStyle = "#8a94a3";
    ctx.lineWidth = 1;
    ctx.textAlign = "right";
    ctx.textBaseline = "middle";
    for (let i = 0; i <= 4; i++) {
      const y = y0 + ((y1 - y0) * i) / 4;
      ctx.beginPath();
      ctx.moveTo(m.l, Math.round(py(y)) + 0.5);
      ctx.lineTo(W - m.r, Math.round(py(y)) + 0.5);
      ctx.stroke();
      ctx.fillText(Math.abs(y) < 1e-3 && y !== 0 ? y.toExponential(1) : y.toPrecision(3), m.l - 6, py(y));
    }
    ctx.textAlign = "center";
    ctx.textBaseline = "top";
    for (let i = 0; i <= 4; i++) {
      const x = x0 + ((x1 - x0) * i) / 4;
      ctx.fillText(short(Math.round(x)), px(x), H - m.b + 6);
    }

    const line = (vals, style, width) => {
      ctx.strokeStyle = style;
      ctx.lineWidth = width;
      ctx.beginPath();
      vals.forEach((y, i) => (i ? ctx.lineTo(px(xs[i]), py(y)) : ctx.moveTo(px(xs[i]), py(y))));
      if (vals.length === 1) ctx.lineTo(px(xs[0]) + 2, py(vals[0]));
      ctx.stroke();
    };
    line(ys, "rgba(255,159,28,0.30)", 1);
    line(smooth, "#ff9f1c", 2);

    // the second curve: the judge's km between Unstucks on held-out towns, on its own axis at the right
    if (score) {
      const ks = score.pts.map((p) => p[1]);
      const k1 = Math.max(...ks, 1e-3) * 1.15;
      const ky = (k) => H - m.b - (Math.min(k, k1) / k1) * (H - m.t - m.b);
      ctx.strokeStyle = "#2ec4b6";
      ctx.fillStyle = "#2ec4b6";
      ctx.lineWidth = 2;
      ctx.beginPath();
      score.pts.forEach((p, i) => (i ? ctx.lineTo(px(p[0]), ky(p[1])) : ctx.moveTo(px(p[0]), ky(p[1]))));
      ctx.stroke();
      for (const p of score.pts) {
        ctx.beginPath();
        ctx.arc(px(p[0]), ky(p[1]), 3, 0, 2 * Math.PI);
        ctx.fill();
      }
      if (score.ref !== null && score.ref <= k1) {
        ctx.setLineDash([6, 4]);
        ctx.lineWidth = 1;
        ctx.beginPath();
        ctx.moveTo(m.l, Math.round(ky(score.ref)) + 0.5);
        ctx.lineTo(W - m.r, Math.round(ky(score.ref)) + 0.5);
        ctx.stroke();
        ctx.setLineDash([]);
      }
      ctx.font = "11px 'DejaVu Sans Mono', monospace";
      ctx.textAlign = "left";
      ctx.textBaseline = "middle";
      for (let i = 0; i <= 4; i++) ctx.fillText(((k1 * i) / 4).toPrecision(2), W - m.r + 2, ky((k1 * i) / 4));
    }

    ctx.textAlign = "left";
    ctx.textBaseline = "top";
    ctx.fillStyle = "#d7dde5";
    ctx.font = "14px 'DejaVu Sans Mono', monospace";
    ctx.fillText(`loss ${num(smooth[smooth.length - 1], 4)}  (raw ${num(ys[ys.length - 1], 4)})`, m.l + 4, 8);
    ctx.textAlign = "right";
    ctx.fillStyle = "#8a94a3";
    ctx.fillText(`batch ${num(xs[xs.length - 1])}`, W - m.r, 8);
    if (score) {
      const last = score.pts[score.pts.length - 1];
      ctx.fillStyle = "#2ec4b6";
      ctx.textAlign = "left";
      ctx.font = "13px 'DejaVu Sans Mono', monospace";
      const ref = score.ref !== null ? `  (NPC ${num(score.ref, 2)})` : "";
      const onRoad = Math.round(100 * (last[2] || 0));
      ctx.fillText(`km between Unstucks ${num(last[1], 3)} at ${short(last[0])}, on road ${onRoad}%${ref}`, m.l + 4, 27);
    }
  }

  let lastLossKey = "";
  function renderLoss() {
    const tile = $("#tile-loss");
    const t = source("trainer");
    setStale(tile, t);
    const hist = t && Array.isArray(t.state.loss_history) ? t.state.loss_history : [];
    const points = hist.filter((p) => Array.isArray(p) && isNum(p[0]) && isNum(p[1]));
    const sub = $("#loss-sub");
    if (points.length) {
      lossCanvas.classList.add("shown");
      lossImg.classList.remove("shown");
      tile.classList.add("live");
      const score = judgeScore(t);
      sub.textContent = score ? "loss and driving score" : "loss";
      const sp = score ? score.pts : [];
      const key = `${points.length}:${points[0]}:${points[points.length - 1]}:${sp.length}:${sp[sp.length - 1]}:${score ? score.ref : ""}`;
      if (key !== lastLossKey) {
        lastLossKey = key;
        drawLoss(points, score);
      }
      return;
    }
    lastLossKey = "";
    lossCanvas.classList.remove("shown");
    sub.textContent = "";
    tile.classList.toggle("live", lossPicture.shown);
    if (!t) setPlaceholder(tile, "waiting for the trainer…");
    else setPlaceholder(tile, "waiting for the first training batch…");
  }

  // -- the loops ---------------------------------------------------------------------------------------

  // Errors are counted on <body data-errors> (what the browser test reads) as well as logged.
  let errors = 0;
  function failed(e) {
    errors += 1;
    document.body.dataset.errors = String(errors);
    console.error(e);
  }
  window.addEventListener("error", (ev) => failed(ev.error || ev.message));

  function render() {
    for (const f of [renderCameras, renderPlayer, renderTrainer, renderLoss]) {
      try {
        f();
      } catch (e) {
        failed(e); // one tile's bad state must not blank the others
      }
    }
  }

  async function pollState() {
    for (;;) {
      try {
        const q = new URLSearchParams({ client });
        for (const role of ROLES) if (params.get(role)) q.set(role, params.get(role));
        const r = await fetch(`/api/state?${q}`, { cache: "no-store" });
        if (r.ok) {
          snap = await r.json();
          render();
        }
      } catch {
        // the viewer restarting: keep the last picture up and try again
      }
      await sleep(STATE_MS);
    }
  }

  render();
  pollState();
  for (const { pic } of cameraTiles) pic.run();
  histogram.run();
  lossPicture.run();
  reportPaints();
})();
