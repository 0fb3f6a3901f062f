/* xray-edge live view: read-only page fed by Server-Sent Events (or, in a
   report, by the data embedded in the page). Nothing here sends anything. */
(function () {
  'use strict';
  const $ = (id) => document.getElementById(id);
  const MAXPTS = 3000;      // frames kept for the plots
  const WINDOW = 100;       // rolling window (frames) for hit rate and latency percentiles
  const HIT_MIN = 20;       // a frame with at least this many peaks is a hit
  const MAXLOG = 500;       // command-log rows shown
  const SVG = 'http://www.w3.org/2000/svg';

  const S = { header: {}, frames: [], drops: [], dropped: 0, commands: [], state: null, ended: false,
              mode: 'live', saved: [], image: null, levels: null };
  let embedded = null;
  let dirty = false;

  const params = new URLSearchParams(location.search);
  const token = params.get('token');
  const api = (p) => token ? p + (p.includes('?') ? '&' : '?') + 'token=' + encodeURIComponent(token) : p;

  const esc = (s) => String(s === undefined || s === null ? '' : s).replace(/[&<>"']/g,
    (c) => ({ '&': '&amp;', '<': '&lt;', '>': '&gt;', '"': '&quot;', "'": '&#39;' }[c]));
  const fmt = (v, d = 1) => (v === null || v === undefined || Number.isNaN(v)) ? '–' : Number(v).toFixed(d);

  function wallTime(tSource) {
    const h = S.header;
    if (tSource === undefined || h.t_wall === undefined || h.t_perf === undefined) return null;
    return new Date((h.t_wall + (tSource - h.t_perf)) * 1000);
  }
  function timeStr(tSource, ms = true) {
    const d = wallTime(tSource);
    if (!d) return tSource !== undefined ? 't=' + fmt(tSource, 3) + ' s' : '–';
    const p = (n, w = 2) => String(n).padStart(w, '0');
    return p(d.getHours()) + ':' + p(d.getMinutes()) + ':' + p(d.getSeconds()) + (ms ? '.' + p(d.getMilliseconds(), 3) : '');
  }

  // ------------------------------------------------------------------ header and state
  function renderHeader() {
    const h = S.header;
    $('hdr-version').textContent = h.version ? 'v' + h.version : '';
    $('hdr-source').textContent = h.source || '–';
    const g = h.geometry;
    $('hdr-geometry').textContent = g ? `${g.shape[1]}×${g.shape[0]} px, ${+Number(g.pixel_size_mm).toPrecision(4)} mm pixels, ` +
      `distance ${fmt(g.distance_mm, 1)} mm, λ ${fmt(g.wavelength_A, 4)} Å, beam (${fmt(g.beam_center[0])}, ${fmt(g.beam_center[1])}) px` : '–';
    $('hdr-policy').textContent = h.policy || '–';
    $('hdr-limits').textContent = h.limits || '–';
    $('hdr-port').textContent = h.port || '–';
    $('hdr-started').textContent = h.started || '–';
    $('hdr-results').textContent = h.results || '–';
    const b = $('mode-badge');
    const past = S.mode === 'replay' || embedded;
    if (h.dry_run === true) { b.textContent = past ? 'DRY RUN: commands were validated and logged, never sent' : 'DRY RUN: commands validated and logged, never sent'; b.className = 'badge dry'; }
    else if (h.dry_run === false) { b.textContent = past ? 'LIVE RUN: commands went to the instrument' : 'LIVE: commands go to the instrument'; b.className = 'badge live'; }
    else { b.textContent = ''; b.className = 'badge'; }
  }

  function renderState() {
    const st = S.state;
    const banner = $('safe-banner');
    if (!st) {
      $('state').textContent = S.header.dry_run ? 'dry run: no device connected' :
        (S.mode === 'replay' ? 'no device state in this record (command acknowledgements carry it)' : 'no device state received yet');
      banner.hidden = true; document.body.classList.remove('safe');
      return;
    }
    const safe = !!st.safe_state;
    banner.hidden = !safe;
    document.body.classList.toggle('safe', safe);
    if (safe) {
      banner.innerHTML = 'DEVICE IN SAFE STATE — shutter closed, attenuation ' + esc(st.attenuation) +
        ', alarm ' + esc(st.alarm_code) + '<small>The instrument stopped hearing from edge (heartbeat lost) and ' +
        'protected itself. It leaves this state only on an explicit resume by an operator; ' +
        'corrections are rejected until then.</small>';
    }
    const cells = [
      ['shutter', st.shutter_open ? 'OPEN' : 'closed'], ['attenuation', st.attenuation], ['gain', st.gain],
      ['exposure', st.exposure_s !== undefined ? fmt(st.exposure_s, 4) + ' s' : st.exposure_us !== undefined ? st.exposure_us + ' µs' : '–'],
      ['beam x', st.beam_x_um !== undefined ? fmt(st.beam_x_um, 1) + ' µm' : '–'],
      ['beam y', st.beam_y_um !== undefined ? fmt(st.beam_y_um, 1) + ' µm' : '–'],
      ['alarm', st.alarm_code ? st.alarm_code + (st.alarm_active ? ' (active)' : '') : 'none'],
      ['heartbeat age', st.heartbeat_age_ms !== undefined && st.heartbeat_age_ms !== null ? st.heartbeat_age_ms + ' ms' : '–'],
      ['applied', st.applied_count], ['from', st.source || '–'],
    ];
    $('state').innerHTML = `<div class="safe-cell ${safe ? 'on' : 'off'}" id="safe-state">` +
      (safe ? 'SAFE STATE ACTIVE' : 'normal operation (not in safe state)') + '</div>' +
      cells.map(([k, v]) => `<div><span>${esc(k)}</span>${esc(v === undefined ? '–' : v)}</div>`).join('');
  }

  // ------------------------------------------------------------------ frame image
  function showImage(img) {
    if (!img || !img.png) return;
    const im = new Image();
    im.onload = () => {
      const c = document.createElement('canvas');
      c.width = im.width; c.height = im.height;
      const ctx = c.getContext('2d');
      ctx.drawImage(im, 0, 0);
      const rgba = ctx.getImageData(0, 0, im.width, im.height).data;
      const lv = new Uint8Array(im.width * im.height);
      for (let i = 0; i < lv.length; i++) lv[i] = rgba[4 * i];
      S.image = img; S.levels = { w: im.width, h: im.height, data: lv };
      const sel = $('saved');
      if ([...sel.options].some((o) => +o.value === img.frame)) sel.value = img.frame;
      drawImage(); drawOverlay(); frameInfo();
    };
    im.src = 'data:image/png;base64,' + img.png;
  }

  const toCounts = (level, vmax) => Math.expm1(level / 254 * Math.log1p(vmax));
  const sliderCounts = (pos, vmax) => Math.expm1(pos / 1000 * Math.log1p(vmax));
  const countsSlider = (c, vmax) => Math.round(1000 * Math.log1p(Math.max(c, 0)) / Math.log1p(vmax));

  function autoContrast() {
    const L = S.levels, vmax = S.image.vmax;
    const hist = new Uint32Array(256);
    for (let i = 0; i < L.data.length; i++) hist[L.data[i]]++;
    let n = 0; for (let v = 0; v < 255; v++) n += hist[v];
    let acc = 0, lo = 0, hi = 254;
    // black at the median block (background), white at the 99.9th percentile (inside peaks)
    for (let v = 0; v < 255; v++) { acc += hist[v]; if (acc >= 0.5 * n) { lo = v; break; } }
    acc = 0;
    for (let v = 0; v < 255; v++) { acc += hist[v]; if (acc >= 0.999 * n) { hi = v; break; } }
    $('black').value = countsSlider(toCounts(lo, vmax), vmax);
    $('white').value = Math.max(countsSlider(toCounts(hi, vmax), vmax), +$('black').value + 20);
  }

  function drawImage() {
    if (!S.levels) return;
    const L = S.levels, vmax = S.image.vmax;
    if ($('auto').checked) autoContrast();
    const black = sliderCounts(+$('black').value, vmax), white = Math.max(sliderCounts(+$('white').value, vmax), black + 1e-6);
    $('black-v').textContent = fmt(black, 0); $('white-v').textContent = fmt(white, 0);
    const log = $('scale').value === 'log', cmap = $('cmap').value;
    const lut = new Uint8ClampedArray(256 * 3);
    for (let v = 0; v < 256; v++) {
      let r, g, b;
      if (v === 255) { r = 59; g = 110; b = 165; }
      else {
        const c = toCounts(v, vmax);
        let t = log ? (Math.log1p(c) - Math.log1p(black)) / (Math.log1p(white) - Math.log1p(black)) : (c - black) / (white - black);
        t = Math.min(1, Math.max(0, t));
        if (cmap === 'inv') { r = g = b = 255 * (1 - t); }
        else if (cmap === 'grey') { r = g = b = 255 * t; }
        else { r = 255 * Math.min(1, 3 * t); g = 255 * Math.min(1, Math.max(0, 3 * t - 1)); b = 255 * Math.max(0, 3 * t - 2); }
      }
      lut[3 * v] = r; lut[3 * v + 1] = g; lut[3 * v + 2] = b;
    }
    const cv = $('frame-canvas');
    if (cv.width !== L.w || cv.height !== L.h) { cv.width = L.w; cv.height = L.h; }
    const ctx = cv.getContext('2d');
    const out = ctx.createImageData(L.w, L.h);
    const d = out.data;
    for (let i = 0; i < L.data.length; i++) {
      const v = 3 * L.data[i];
      d[4 * i] = lut[v]; d[4 * i + 1] = lut[v + 1]; d[4 * i + 2] = lut[v + 2]; d[4 * i + 3] = 255;
    }
    ctx.putImageData(out, 0, 0);
    $('no-frame').hidden = true;
  }

  function el(tag, attrs) {
    const e = document.createElementNS(SVG, tag);
    for (const k in attrs) e.setAttribute(k, attrs[k]);
    return e;
  }

  function drawOverlay() {
    const img = S.image; if (!img) return;
    const [ny, nx] = img.shape, f = img.factor;
    const svg = $('overlay');
    // the image covers ceil(n / f) * f detector pixels; pixel centres at integers
    svg.setAttribute('viewBox', `-0.5 -0.5 ${Math.ceil(nx / f) * f} ${Math.ceil(ny / f) * f}`);
    const [bx, by] = img.beam_center;
    const rings = $('rings'); rings.replaceChildren();
    if ($('show-rings').checked) {
      const fs = Math.max(nx, ny) / 45;
      for (const r of img.rings) {
        rings.appendChild(el('circle', { cx: bx, cy: by, r: r.r }));
        const a = -Math.PI / 4, tx = bx + r.r * Math.cos(a), ty = by + r.r * Math.sin(a);
        if (tx > 0 && tx < nx && ty > fs && ty < ny) {
          const t = el('text', { x: tx + fs * 0.2, y: ty, 'font-size': fs });
          t.textContent = r.d + ' Å'; rings.appendChild(t);
        }
      }
    }
    const beam = $('beam'); beam.replaceChildren();
    const arm = Math.max(nx, ny) / 40;
    beam.appendChild(el('line', { x1: bx - arm, y1: by, x2: bx + arm, y2: by }));
    beam.appendChild(el('line', { x1: bx, y1: by - arm, x2: bx, y2: by + arm }));
    const g = $('peak-markers'); g.replaceChildren();
    const xs = img.peaks.x, ys = img.peaks.y, rad = Math.max(4 * f, Math.max(nx, ny) / 180);
    let drawn = 0;
    if ($('show-peaks').checked) {
      const frag = document.createDocumentFragment();
      for (let i = 0; i < xs.length; i++) { frag.appendChild(el('circle', { cx: xs[i], cy: ys[i], r: rad, class: 'peak' })); drawn++; }
      g.appendChild(frag);
    }
    g.setAttribute('data-count', drawn);
    g.setAttribute('data-frame', img.frame);
  }

  function frameInfo() {
    const img = S.image; if (!img) return;
    $('frame-no').textContent = img.frame;
    $('frame-time').textContent = timeStr(img.t_source);
    $('frame-peaks').textContent = img.n_peaks;
    $('frame-flags').textContent = (img.flags && img.flags.length) ? img.flags.join(', ') : 'none';
    $('frame-scale').textContent = `image ${S.levels.w}×${S.levels.h}, ${img.factor}×${img.factor} detector pixels per image pixel (block maximum), full scale ${fmt(img.vmax, 0)} counts`;
  }

  // ------------------------------------------------------------------ plots
  const PLOTS = [];
  const COLORS = ['#1f77b4', '#d62728', '#2ca02c', '#9467bd', '#ff7f0e', '#8c564b', '#e377c2', '#17becf', '#7f7f7f', '#bcbd22'];

  function classes() {
    const h = S.header;
    if (h.classes && h.classes.length) return h.classes;
    for (let i = S.frames.length - 1; i >= 0; i--) {
      const p = S.frames[i].probabilities; if (p && Object.keys(p).length) return Object.keys(p);
    }
    return [];
  }

  function quant(sorted, q) {
    if (!sorted.length) return null;
    const pos = (sorted.length - 1) * q, lo = Math.floor(pos), hi = Math.ceil(pos);
    return sorted[lo] + (sorted[hi] - sorted[lo]) * (pos - lo);
  }
  function rolling(values, fn) {
    const out = new Array(values.length), win = [];
    for (let i = 0; i < values.length; i++) {
      win.push(values[i]); if (win.length > WINDOW) win.shift();
      out[i] = fn(win);
    }
    return out;
  }
  const pct = (q) => (w) => quant(w.filter((v) => v !== null && v !== undefined).sort((a, b) => a - b), q);

  function series() {
    const F = S.frames;
    const x = F.map((f) => f.frame);
    const col = (k) => F.map((f) => (f[k] === undefined ? null : f[k]));
    const stage = (k) => F.map((f) => (f.stages_ms ? f.stages_ms[k] : null));
    const cmdAt = new Map();
    for (const c of S.commands) if (c.wire_ms !== undefined || c.ack_ms !== undefined) cmdAt.set(c.frame, c);
    // cumulative drops at each processed frame
    const drops = S.drops.map((d) => d.frame).sort((a, b) => a - b);
    const base = S.dropped - S.drops.length;
    let j = 0;
    const dropped = x.map((i) => { while (j < drops.length && drops[j] <= i) j++; return base + j; });
    const cls = classes();
    const lat = col('latency_ms');
    return {
      x, cls,
      peaks: [x, col('n_peaks')],
      hit: [x, rolling(col('n_peaks'), (w) => 100 * w.filter((v) => v >= HIT_MIN).length / w.length)],
      bg: [x, col('background')],
      snr: [x, col('median_snr')],
      prob: [x, ...cls.map((c) => F.map((f) => (f.probabilities && f.probabilities[c] !== undefined ? f.probabilities[c] : null)))],
      lat: [x, rolling(lat, pct(0.5)), rolling(lat, pct(0.99)),
        x.map((i) => (cmdAt.has(i) && cmdAt.get(i).wire_ms !== undefined ? cmdAt.get(i).wire_ms : null)),
        x.map((i) => (cmdAt.has(i) && cmdAt.get(i).ack_ms !== undefined ? cmdAt.get(i).ack_ms : null))],
      stages: [x, ...['background', 'peaks', 'features', 'inference', 'policy'].map((k) => rolling(stage(k), pct(0.5))),
        rolling(stage('total'), pct(0.5)), rolling(stage('total'), pct(0.99))],
      drop: [x, dropped],
    };
  }

  // flag thresholds as dashed lines in each class's colour (not series: they would crowd the legend)
  function thresholdHook(u) {
    const thr = S.header.thresholds || {}, cls = classes(), ctx = u.ctx;
    ctx.save(); ctx.setLineDash([6, 4]); ctx.lineWidth = 1.2;
    cls.forEach((c, i) => {
      if (thr[c] === undefined) return;
      const y = Math.round(u.valToPos(thr[c], 'y', true));
      ctx.strokeStyle = COLORS[i % COLORS.length];
      ctx.beginPath(); ctx.moveTo(u.bbox.left, y); ctx.lineTo(u.bbox.left + u.bbox.width, y); ctx.stroke();
    });
    ctx.restore();
  }

  function makePlot(key, title, seriesDefs, opts = {}) {
    const wrap = document.createElement('div'); wrap.className = 'plot'; wrap.id = 'plot-' + key;
    const h = document.createElement('h3'); h.textContent = title; wrap.appendChild(h);
    $('plots').appendChild(wrap);
    const width = Math.max(300, wrap.clientWidth || 330);
    const u = new uPlot({
      width, height: 170, legend: { show: true, live: false },
      scales: { x: { time: false }, y: opts.y || {} },
      axes: [{ label: 'frame', size: 30, labelSize: 14 }, { size: 50 }],
      series: [{ label: 'frame' }, ...seriesDefs],
      cursor: { drag: { x: false, y: false } },
      hooks: opts.hooks || {},
    }, [[]].concat(seriesDefs.map(() => [])), wrap);
    PLOTS.push({ key, u, wrap });
    return u;
  }

  let plotClasses = null;
  function buildPlots(cls) {
    for (const p of PLOTS) p.u.destroy();
    PLOTS.length = 0; $('plots').replaceChildren();
    const line = (label, i, extra = {}) => Object.assign({ label, stroke: COLORS[i % COLORS.length], width: 1.4, points: { show: false } }, extra);
    const dots = (label, i) => ({ label, stroke: COLORS[i % COLORS.length], width: 0, points: { show: true, size: 4, fill: COLORS[i % COLORS.length] } });
    makePlot('peaks', 'Peaks per frame', [line('peaks', 0)]);
    makePlot('hit', `Hit rate (% of last ${WINDOW} frames with ≥ ${HIT_MIN} peaks)`, [line('hit rate %', 2)], { y: { range: [0, 100] } });
    makePlot('bg', 'Background level (counts/pixel, median over rings)', [line('background', 5)]);
    makePlot('snr', 'Median peak SNR', [line('median SNR', 3)]);
    makePlot('prob', 'Anomaly probability per class (dashed: flag threshold)',
      cls.map((c, i) => line(c, i)), { y: { range: [0, 1] }, hooks: { draw: [thresholdHook] } });
    makePlot('lat', `Latency, ms (frame in → processed p50/p99 over ${WINDOW} frames; commands: in → wire, in → ack)`,
      [line('processed p50', 0), line('processed p99', 1), dots('→ command on wire', 2), dots('→ ack', 3)]);
    makePlot('stages', 'Per-stage time, ms (p50; total p50/p99)',
      [...['background', 'peaks', 'features', 'inference', 'policy'].map((k, i) => line(k, i + 4)),
        line('total p50', 0), line('total p99', 1)]);
    makePlot('drop', 'Frames dropped (cumulative)', [line('dropped', 1, { fill: 'rgba(214,39,40,.15)' })]);
    plotClasses = cls.join(',');
  }

  function renderPlots() {
    const s = series();
    if (plotClasses !== s.cls.join(',')) buildPlots(s.cls);
    for (const p of PLOTS) p.u.setData(s[p.key]);
  }

  function renderSummary() {
    const F = S.frames;
    const last = F.slice(-WINDOW);
    const lat = last.map((f) => f.latency_ms).filter((v) => v !== undefined).sort((a, b) => a - b);
    let fps = null;
    if (last.length > 1) {
      const dt = last[last.length - 1].t_source - last[0].t_source;
      if (dt > 0) fps = (last.length - 1) / dt;
    }
    const c = countOutcomes();
    $('summary').innerHTML = [
      ['last frame', F.length ? F[F.length - 1].frame : '–'], ['dropped', S.dropped],
      ['rate', fmt(fps, 1) + ' frames/s'], ['latency p50 / p99', fmt(quant(lat, 0.5), 1) + ' / ' + fmt(quant(lat, 0.99), 1) + ' ms'],
      ['commands', S.commands.filter((x) => x.status !== 'mask' && x.type !== 'device').length], ['acked', c.ok], ['not applied', c.bad],
      ['state', S.ended ? 'run ended' : (S.mode === 'replay' ? 'replay' : 'running')],
    ].map(([k, v]) => `<span>${esc(k)} <b>${esc(v)}</b></span>`).join('');
  }

  // ------------------------------------------------------------------ command log
  function countOutcomes() {
    let ok = 0, bad = 0;
    for (const c of S.commands) { if (c.status === 'ok') ok++; else if (['rejected', 'failed', 'refused', 'dropped', 'error'].includes(c.status)) bad++; }
    return { ok, bad };
  }

  function outcome(c) {
    const s = c.status;
    if (s === 'ok') {
      const rtt = (c.ack_ms !== undefined && c.wire_ms !== undefined) ? c.ack_ms - c.wire_ms : null;
      return 'acked' + (rtt !== null ? `, round trip ${fmt(rtt, 1)} ms` : '') + (c.ack_ms !== undefined ? `, frame in → ack ${fmt(c.ack_ms, 1)} ms` : '') +
        (c.attempts > 1 ? `, ${c.attempts} attempts` : '');
    }
    if (s === 'rejected') return 'rejected by the device: ' + (c.error || '');
    if (s === 'refused') return 'refused by the bridge: ' + (c.error || '');
    if (s === 'failed') return 'FAILED: ' + (c.error || '');
    if (s === 'dropped') return 'dropped: ' + (c.error || '');
    if (s === 'dry_run') return 'dry run: validated, not sent';
    if (s === 'no_device') return 'no device: not sent';
    if (s === 'mask') return 'masked locally (no command)';
    if (s === 'safe_state') return 'DEVICE IN SAFE STATE';
    if (s === 'resumed') return 'device resumed normal operation';
    if (s === 'error') return 'processing error: ' + (c.error || '');
    return s || '';
  }

  function evidence(c) {
    const ev = c.evidence || {}, thr = S.header.thresholds || {};
    const parts = [];
    if (c.reason) parts.push(esc(c.reason));
    const probs = ev.probabilities || {};
    const flagged = (ev.flags || []).map((f) => `${esc(f)} ${fmt(probs[f], 2)}` + (thr[f] !== undefined ? ` (≥ ${thr[f]})` : ''));
    if (flagged.length) parts.push('flags: ' + flagged.join(', '));
    if (ev.n_peaks !== undefined) parts.push(`${ev.n_peaks} peaks, median SNR ${fmt(ev.median_snr, 1)}`);
    if (ev.beam_offset_px) parts.push(`beam offset (${fmt(ev.beam_offset_px[0])}, ${fmt(ev.beam_offset_px[1])}) px`);
    return parts.join('<br>');
  }

  function renderLog() {
    const rows = S.commands.slice(-MAXLOG).reverse().map((c) => {
      const args = c.args ? Object.entries(c.args).map(([k, v]) => `${k}=${JSON.stringify(v)}`).join(', ') : '';
      const what = c.status === 'mask' ? `mask rows ${c.region[0]}:${c.region[1]}, cols ${c.region[2]}:${c.region[3]}` :
        c.type === 'device' ? 'state change (from the device)' : `${c.name}(${args})`;
      return `<tr data-frame="${esc(c.frame)}" data-status="${esc(c.status)}"><td>${esc(c.frame)}</td><td>${esc(timeStr((c.evidence || {}).t_source, false))}</td>` +
        `<td>${esc(c.rule || '')}</td><td><code>${esc(what)}</code></td><td>${evidence(c)}</td>` +
        `<td class="${esc(c.status)}">${esc(outcome(c))}</td></tr>`;
    });
    $('cmdlog').innerHTML = rows.join('') || '<tr><td colspan="6">no commands yet</td></tr>';
    const c = countOutcomes();
    $('cmd-counts').textContent = `${S.commands.length} entries, ${c.ok} acked, ${c.bad} not applied`;
  }

  // ------------------------------------------------------------------ data in
  function addFrames(frames) {
    for (const f of frames) {
      S.frames.push(f);
      for (const a of f.actions || []) {
        if (a.action === 'mask') S.commands.push({ frame: f.frame, rule: a.rule, status: 'mask', region: a.region, evidence: { t_source: f.t_source, flags: f.flags, probabilities: f.probabilities, n_peaks: f.n_peaks, median_snr: f.median_snr } });
      }
    }
    if (S.frames.length > MAXPTS) S.frames.splice(0, S.frames.length - MAXPTS);
  }

  function applySnapshot(snap) {
    S.header = snap.header || {}; S.mode = snap.mode || 'live'; S.ended = !!snap.ended;
    S.frames = []; S.commands = [];
    S.drops = snap.drops || []; S.dropped = snap.dropped || 0; S.state = snap.state || null;
    addFrames(snap.frames || []);
    S.commands.push(...(snap.commands || []));
    S.commands.sort((a, b) => (a.frame || 0) - (b.frame || 0));
    S.saved = snap.saved_frames || [];
    renderHeader(); renderState(); renderSaved();
    if (snap.image) showImage(snap.image);
    dirty = true;
  }

  function applyUpdate(u) {
    addFrames(u.frames || []);
    S.commands.push(...(u.commands || []));
    if (S.commands.length > 5000) S.commands.splice(0, S.commands.length - 5000);
    S.drops.push(...(u.drops || [])); if (S.drops.length > MAXPTS) S.drops.splice(0, S.drops.length - MAXPTS);
    S.dropped = u.dropped !== undefined ? u.dropped : S.dropped;
    if (u.ended) S.ended = true;
    if (u.header) { S.header = u.header; renderHeader(); }
    if (u.state) { S.state = u.state; renderState(); }
    dirty = true;
  }

  function renderSaved() {
    const sel = $('saved');
    if (S.mode !== 'replay' && !embedded) { $('saved-wrap').hidden = true; return; }
    const list = embedded ? Object.keys(embedded.images || {}).map(Number).sort((a, b) => a - b) : S.saved;
    $('saved-wrap').hidden = !list.length;
    sel.innerHTML = list.map((n) => `<option value="${n}">frame ${n}</option>`).join('');
    if (S.image) sel.value = S.image.frame;
  }

  $('saved').addEventListener('change', (e) => {
    const n = e.target.value;
    if (embedded) { showImage(embedded.images[n]); return; }
    fetch(api('api/frame?n=' + n)).then((r) => r.ok ? r.json() : null).then((img) => img && showImage(img));
  });

  // Plots, summary and log are redrawn at most every RENDER_MS, never while
  // the tab is hidden: redrawing eight plots at the 10 Hz update rate kept a
  // core busy, which on a small board is taken from the loop itself.
  const RENDER_MS = 500;
  let lastRender = -Infinity;
  function tick(now) {
    if (dirty && !document.hidden && now - lastRender >= RENDER_MS) {
      dirty = false;
      lastRender = now;
      renderPlots(); renderSummary(); renderLog();
      const conn = $('conn');
      if (S.ended) { conn.textContent = 'run ended'; conn.className = 'conn'; }
    }
    requestAnimationFrame(tick);
  }

  for (const id of ['scale', 'cmap', 'black', 'white', 'auto']) {
    $(id).addEventListener('input', () => {
      if (id === 'black' || id === 'white') $('auto').checked = false;
      drawImage();
    });
  }
  for (const id of ['show-peaks', 'show-rings']) $(id).addEventListener('change', drawOverlay);

  const dataEl = document.getElementById('edge-data');
  if (dataEl) {
    embedded = JSON.parse(dataEl.textContent);
    applySnapshot(embedded.snapshot);
    $('conn').textContent = 'report (static, generated ' + (embedded.generated || '') + ')';
    $('mode-badge').className += ' replay';
  } else {
    const es = new EventSource(api('events'));
    es.addEventListener('snapshot', (e) => { applySnapshot(JSON.parse(e.data)); });
    es.addEventListener('update', (e) => { applyUpdate(JSON.parse(e.data)); });
    es.addEventListener('image', (e) => { showImage(JSON.parse(e.data)); });
    es.onopen = () => { const c = $('conn'); c.textContent = S.mode === 'replay' ? 'replay of a recorded run' : 'live'; c.className = 'conn'; };
    es.onerror = () => { const c = $('conn'); c.textContent = S.ended ? 'run ended, server closed' : 'disconnected: retrying…'; c.className = S.ended ? 'conn' : 'conn bad'; };
  }
  requestAnimationFrame(tick);
})();
