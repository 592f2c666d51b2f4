// The sweep dashboard: one page, views by URL fragment, data from the coordinator's JSON API
// (the shapes `sweep … --output json` prints), live through server-sent events. Every name is
// set as text (never markup), with control characters escaped.
'use strict';

const main = document.getElementById('main');
const liveBadge = document.getElementById('live');
let stream = null; // the EventSource of the view shown, if any
let charts = []; // uPlot instances of the view shown
let refreshTimer = null; // a live refresh of the view shown, waiting
let view = 0; // which view is shown: a view that is no longer shown draws nothing

// ---------------------------------------------------------------------------------------------
// Helpers
// ---------------------------------------------------------------------------------------------

/** A name as text: control characters (C0, DEL, C1, line and paragraph separators, and the
 * bidirectional controls that would reorder what is shown) as `\u{…}` escapes. */
function clean(s) {
  return String(s ?? '').replace(/[\u0000-\u001f\u007f-\u009f\u061c\u200e\u200f\u2028-\u202e\u2066-\u2069]/g,
    (c) => '\\u{' + c.charCodeAt(0).toString(16) + '}');
}

/** An element with attributes and children (strings become text nodes). */
function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'class') e.className = v;
    else if (k === 'onclick' || k === 'onchange' || k === 'oninput') e[k] = v;
    else e.setAttribute(k, v);
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(clean(c)));
  }
  return e;
}

function svgEl(tag, attrs, text) {
  const e = document.createElementNS('http://www.w3.org/2000/svg', tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, v);
  if (text !== undefined) e.textContent = clean(text);
  return e;
}

const pct = (v) => (v === null || v === undefined || Number.isNaN(v) ? '–' : (v * 100).toFixed(1) + '%');
const when = (ms) => (ms ? new Date(ms).toISOString().replace('T', ' ').slice(0, 19) : '–');
function duration(s) {
  if (s === null || s === undefined || s < 0) return '–';
  if (s < 60) return s.toFixed(0) + 's';
  if (s < 3600) return Math.floor(s / 60) + 'm' + String(Math.round(s % 60)).padStart(2, '0') + 's';
  return Math.floor(s / 3600) + 'h' + String(Math.floor((s % 3600) / 60)).padStart(2, '0') + 'm';
}
const count = (n) => (!n ? '–' : n >= 1e6 ? (n / 1e6).toFixed(1) + 'M' : n >= 1e3 ? Math.round(n / 1e3) + 'k' : String(n));
const lrLabel = (d) => (!d ? '' : d.strategy === 'linear'
  ? `linear(${d.head_lr}→${d.final_lr})` : d.strategy === 'exponential' ? `exponential(${d.head_lr}/${d.factor})` : d.strategy);
const split = (s) => `${s[0]}+${s[1]}`;
const enc = encodeURIComponent;

async function api(path) {
  const r = await fetch(path, { credentials: 'same-origin', headers: { accept: 'application/json' } });
  if (r.status === 401) { location.href = '/login'; throw new Error('log in first'); }
  let body;
  try { body = await r.json(); } catch (_) { body = {}; }
  if (!r.ok) throw new Error(body.error || `${r.status} ${r.statusText}`);
  return body;
}

/** Epochs are whole numbers: ticks at 1, 2, 5, 10, … apart. */
const EPOCH_AXIS = { label: 'epoch', incrs: [1, 2, 5, 10, 20, 50, 100, 200, 500], values: (u, v) => v.map((x) => String(x)) };
const PERCENT_AXIS = { values: (u, v) => v.map((x) => x + '%') };

const PALETTE = ['#2563eb', '#dc2626', '#059669', '#d97706', '#7c3aed', '#db2777', '#0891b2', '#65a30d', '#4b5563', '#ea580c'];

function counts(c, total) {
  const parts = [`${c.completed || 0}/${total} completed`];
  for (const s of ['stopped', 'running', 'paused', 'pending', 'unschedulable', 'failed', 'cancelled']) {
    if (c[s]) parts.push(`${c[s]} ${s}`);
  }
  return parts.join(', ');
}

/** A table whose columns sort on a click; `columns`: [title, value(row), render(row)?, numeric?]. */
function sortable(columns, rows, id) {
  const table = el('table', { id });
  const head = el('tr');
  const body = el('tbody');
  let by = null; let desc = false;
  const fill = () => {
    body.replaceChildren();
    const sorted = by === null ? rows : [...rows].sort((a, b) => {
      const x = columns[by][1](a); const y = columns[by][1](b);
      const r = (x === null || x === undefined) - (y === null || y === undefined) || (x < y ? -1 : x > y ? 1 : 0);
      return desc ? -r : r;
    });
    for (const row of sorted) {
      body.append(el('tr', {}, columns.map((c) => {
        const v = c[2] ? c[2](row) : c[1](row);
        return el('td', { class: c[3] ? 'num' : null }, v instanceof Node ? v : String(v ?? '–'));
      })));
    }
    head.querySelectorAll('th').forEach((th, i) => {
      th.className = (columns[i][3] ? 'num ' : '') + (i === by ? (desc ? 'sorted-desc' : 'sorted-asc') : '');
    });
  };
  columns.forEach((c, i) => head.append(el('th', {
    onclick: () => { desc = by === i ? !desc : !!c[3]; by = i; fill(); },
  }, c[0])));
  table.append(el('thead', {}, head), body);
  fill();
  return table;
}

function stop() {
  view += 1;
  if (stream) { stream.close(); stream = null; }
  if (refreshTimer) { clearTimeout(refreshTimer); refreshTimer = null; }
  liveBadge.hidden = true;
  for (const c of charts) c.destroy();
  charts = [];
}

/** Shows `nodes` as the view (null and undefined left out). */
function show(...nodes) {
  main.replaceChildren(...nodes.flat().filter((n) => n !== null && n !== undefined && n !== false));
}

function fail(e) {
  show(el('p', { class: 'error' }, String(e.message || e)));
}

// ---------------------------------------------------------------------------------------------
// Views
// ---------------------------------------------------------------------------------------------

async function sweepsView() {
  const mine = view;
  const sweeps = await api('/api/sweeps');
  if (mine !== view) return;
  const filter = el('input', { id: 'filter', placeholder: 'filter by name, id or note', type: 'search' });
  const allTags = [...new Set(sweeps.flatMap((s) => s.tags || []))].sort();
  const tagPick = el('select', { id: 'tag-filter', title: 'only sweeps with this tag' },
    el('option', { value: '' }, 'every tag'), ...allTags.map((t) => el('option', { value: t }, t)));
  const holder = el('div');
  const render = () => {
    const q = filter.value.trim().toLowerCase();
    const tag = tagPick.value;
    const rows = sweeps.filter((s) => (!q || s.name.toLowerCase().includes(q) || s.id.toLowerCase().includes(q)
      || (s.note || '').toLowerCase().includes(q)) && (!tag || (s.tags || []).includes(tag)));
    holder.replaceChildren(sortable([
      ['', () => null, (s) => el('input', { type: 'checkbox', class: 'pick', 'data-id': s.id, title: 'compare' })],
      ['sweep', (s) => s.name, (s) => el('a', { href: `#/sweep/${enc(s.id)}`, title: clean((s.note || '').replace(/[\n\t]/g, ' ')) }, s.name)],
      ['tags', (s) => (s.tags || []).join(' '),
        (s) => el('span', {}, ...(s.tags || []).map((t) => el('span', { class: 'tag' }, t)))],
      ['id', (s) => s.id],
      ['state', (s) => s.state, (s) => el('span', { class: `state-${s.state}` }, s.state)],
      ['trials', (s) => s.trial_count, (s) => counts(s.counts, s.trial_count)],
      ['best val acc', (s) => s.best_val_accuracy, (s) => pct(s.best_val_accuracy), true],
      ['started', (s) => s.created_at_ms, (s) => when(s.created_at_ms)],
      ['duration', (s) => ((s.finished_at_ms || Date.now()) - s.created_at_ms) / 1000,
        (s) => duration(((s.finished_at_ms || Date.now()) - s.created_at_ms) / 1000), true],
    ], rows, 'sweeps'));
  };
  filter.oninput = render;
  tagPick.onchange = render;
  const compare = el('button', {
    id: 'compare-picked',
    onclick: () => {
      const ids = [...document.querySelectorAll('input.pick:checked')].map((c) => enc(c.dataset.id));
      if (ids.length) location.hash = `#/compare/${ids.join(',')}`;
    },
  }, 'compare the ticked sweeps');
  show(el('h1', {}, 'Sweeps'), el('div', { class: 'toolbar' }, filter, tagPick, compare), holder);
  render();
}

/** Runs of epochs each trial shares with others or took from an earlier sweep. */
function sharedLabel(t) {
  const runs = [];
  for (const m of t.metrics) {
    const what = m.reused_from ? `from ${m.reused_from}` : m.shared_with.length ? `with ${m.shared_with.join(', ')}` : null;
    const last = runs[runs.length - 1];
    if (what && last && last.what === what && last.to + 1 === m.epoch) last.to = m.epoch;
    else if (what) runs.push({ from: m.epoch, to: m.epoch, what });
  }
  return runs.map((r) => `${r.from === r.to ? 'epoch ' + r.from : `epochs ${r.from}–${r.to}`} ${r.what}`).join('; ');
}

function colourKey(t, by) {
  if (by === 'strategy') return lrLabel(t.lr_decay);
  if (by === 'split') return split(t.epoch_split);
  return t.backbone;
}

function accuracyChart(trials, by, width) {
  const maxEpoch = Math.max(1, ...trials.map((t) => t.epoch_split[0] + t.epoch_split[1]));
  const xs = Array.from({ length: maxEpoch }, (_, i) => i + 1);
  const keys = [...new Set(trials.map((t) => colourKey(t, by)))];
  const colour = (t) => PALETTE[keys.indexOf(colourKey(t, by)) % PALETTE.length];
  const data = [xs];
  const series = [{ label: 'epoch' }];
  for (const t of trials) {
    const ys = xs.map(() => null);
    for (const m of t.metrics) ys[m.epoch - 1] = m.val_accuracy * 100;
    data.push(ys);
    series.push({ label: `${t.trial} ${split(t.epoch_split)}`, stroke: colour(t), width: 1.5, spanGaps: false, points: { size: 4 } });
  }
  const boundaries = [...new Set(trials.map((t) => t.epoch_split[0]))];
  const opts = {
    width, height: 320, series, legend: { show: false },
    scales: { x: { time: false }, y: { range: [0, 100] } },
    axes: [EPOCH_AXIS, { ...PERCENT_AXIS, label: 'validation accuracy' }],
    hooks: {
      draw: [(u) => {
        const ctx = u.ctx;
        ctx.save();
        ctx.setLineDash([4, 4]);
        ctx.strokeStyle = '#9ca3af';
        ctx.fillStyle = '#6b7280';
        ctx.font = `${11 * devicePixelRatio}px system-ui`;
        for (const fe of boundaries) {
          const x = u.valToPos(fe + 0.5, 'x', true);
          ctx.beginPath(); ctx.moveTo(x, u.bbox.top); ctx.lineTo(x, u.bbox.top + u.bbox.height); ctx.stroke();
          ctx.fillText(`FE→FT after ${fe}`, x + 4, u.bbox.top + 12 * devicePixelRatio);
        }
        ctx.restore();
      }],
    },
  };
  const holder = el('div', { id: 'all-trials' });
  charts.push(new uPlot(opts, data, holder));
  const legend = el('div', { class: 'legend', id: 'colour-legend' }, keys.map((k, i) => {
    const s = el('span', {}, k);
    s.style.setProperty('--c', PALETTE[i % PALETTE.length]);
    return s;
  }));
  return el('div', {}, holder, legend);
}

function trialCurves(t, width) {
  const xs = t.metrics.map((m) => m.epoch);
  const data = [xs, t.metrics.map((m) => m.train_accuracy * 100), t.metrics.map((m) => m.val_accuracy * 100)];
  const holder = el('div');
  charts.push(new uPlot({
    width, height: 170, legend: { show: false },
    scales: { x: { time: false }, y: { range: [0, 100] } },
    series: [{ label: 'epoch' }, { label: 'train', stroke: '#9ca3af', width: 1.5 }, { label: 'val', stroke: '#2563eb', width: 2 }],
    axes: [{ ...EPOCH_AXIS, label: null }, PERCENT_AXIS],
  }, data, holder));
  const best = t.metrics.filter((m) => m.phase === 'fine_tuning').reduce((b, m) => (!b || m.val_accuracy > b.val_accuracy ? m : b), null);
  const key = el('div', { class: 'legend' }, el('span', { class: 'train' }, 'train accuracy'), el('span', { class: 'val' }, 'validation accuracy'),
    best ? `best ${pct(best.val_accuracy)} at epoch ${best.epoch}` : null);
  return el('div', {}, holder, key);
}

/** Figure 6: each backbone's best accuracy, with its parameters and device time. */
function backboneBars(trials) {
  const by = new Map();
  for (const t of trials) {
    const b = by.get(t.backbone) || { best: null, params: 0, seconds: 0 };
    for (const m of t.metrics) {
      if (m.phase === 'fine_tuning' && (b.best === null || m.val_accuracy > b.best)) b.best = m.val_accuracy;
      if (!m.reused_from && (!m.shared_with.length || m.shared_with.every((s) => s > t.trial))) b.seconds += m.seconds;
    }
    b.params = Math.max(b.params, t.parameters || 0);
    by.set(t.backbone, b);
  }
  const rows = [...by.entries()].sort((a, b) => (b[1].best ?? -1) - (a[1].best ?? -1));
  const w = 640; const rowH = 34; const left = 110; const barW = 300;
  const svg = svgEl('svg', { width: w, height: rows.length * rowH + 10, id: 'backbones', role: 'img' });
  rows.forEach(([name, b], i) => {
    const y = i * rowH + 5;
    svg.append(svgEl('text', { x: 0, y: y + 18 }, name));
    svg.append(svgEl('rect', { x: left, y, width: Math.max(1, (b.best ?? 0) * barW), height: rowH - 10, fill: PALETTE[i % PALETTE.length] }));
    svg.append(svgEl('text', { x: left + (b.best ?? 0) * barW + 6, y: y + 18 },
      `${pct(b.best)}  ·  ${count(b.params)} parameters  ·  ${duration(b.seconds)} device time`));
  });
  return svg;
}

/** Parallel coordinates: backbone, strategy, head LR, FE epochs, FT epochs → best accuracy. */
function parallel(board) {
  const axes = [
    ['backbone', (e) => e.backbone],
    ['strategy', (e) => (e.lr_decay ? e.lr_decay.strategy : '')],
    ['head LR', (e) => (e.lr_decay ? e.lr_decay.head_lr : 0)],
    ['FE epochs', (e) => e.epoch_split[0]],
    ['FT epochs', (e) => e.epoch_split[1]],
    ['best val acc', (e) => e.best_val_accuracy],
  ];
  const w = 840; const h = 260; const top = 24; const bottom = 20; const gap = (w - 160) / (axes.length - 1);
  const svg = svgEl('svg', { width: w, height: h + top + bottom, id: 'parallel', role: 'img' });
  const pos = axes.map(([, f]) => {
    const vals = board.map(f).filter((v) => v !== null && v !== undefined);
    if (vals.every((v) => typeof v === 'number')) {
      const lo = Math.min(...vals); const hi = Math.max(...vals);
      return { at: (v) => (hi === lo ? 0.5 : (v - lo) / (hi - lo)), ticks: [...new Set(vals)].sort((a, b) => a - b) };
    }
    const cats = [...new Set(vals)].sort();
    return { at: (v) => (cats.length === 1 ? 0.5 : cats.indexOf(v) / (cats.length - 1)), ticks: cats };
  });
  const y = (p) => top + (1 - p) * h;
  axes.forEach(([name], i) => {
    const x = 40 + i * gap;
    svg.append(svgEl('line', { x1: x, x2: x, y1: top, y2: top + h, stroke: '#9ca3af' }));
    svg.append(svgEl('text', { x: x - 20, y: 14 }, name));
    const ticks = pos[i].ticks.length > 8 ? [pos[i].ticks[0], pos[i].ticks[pos[i].ticks.length - 1]] : pos[i].ticks;
    for (const t of ticks) {
      const label = i === axes.length - 1 ? pct(t) : typeof t === 'number' ? String(t) : t;
      svg.append(svgEl('text', { x: x + 4, y: y(pos[i].at(t)) + 4 }, label));
    }
  });
  const accs = board.map((e) => e.best_val_accuracy).filter((v) => v !== null);
  const lo = Math.min(...accs); const hi = Math.max(...accs);
  for (const e of board) {
    const pts = axes.map(([, f], i) => `${40 + i * gap},${y(pos[i].at(f(e)) ?? 0)}`).join(' ');
    const q = e.best_val_accuracy === null || hi === lo ? 0.5 : (e.best_val_accuracy - lo) / (hi - lo);
    svg.append(svgEl('polyline', { points: pts, fill: 'none', stroke: `hsl(${220 - q * 200}, 70%, 45%)`, 'stroke-width': 1.5, opacity: 0.8 }));
  }
  return svg;
}

/** Where the coordinator serves a trial's `best` or `last` checkpoint file. */
const checkpointUrl = (sweepId, trial, kind) => `/api/sweeps/${enc(sweepId)}/trials/${enc(trial)}/checkpoints/${kind}`;

function leaderboardTable(board, trials, sweepId) {
  const byId = new Map(trials.map((t) => [t.trial, t]));
  return sortable([
    ['rank', (e) => e.rank, null, true],
    ['trial', (e) => e.trial, (e) => el('a', { href: `#/sweep/${enc(sweepId)}/trial/${enc(e.trial)}` }, e.trial)],
    ['backbone', (e) => e.backbone],
    ['lr decay', (e) => lrLabel(e.lr_decay)],
    ['split', (e) => split(e.epoch_split)],
    ['state', (e) => e.state, (e) => el('span', { class: `state-${e.state}` }, e.state)],
    ['FE val acc', (e) => e.fe_val_accuracy, (e) => pct(e.fe_val_accuracy), true],
    ['best val acc', (e) => e.best_val_accuracy, (e) => pct(e.best_val_accuracy), true],
    ['best epoch', (e) => e.best_epoch, null, true],
    ['parameters', (e) => e.parameters, (e) => count(e.parameters), true],
    ['wall', (e) => e.wall_seconds, (e) => duration(e.wall_seconds), true],
    ['shared / reused', (e) => sharedLabel(byId.get(e.trial) || { metrics: [] })],
    ['checkpoint', (e) => (e.checkpoints.best ? 1 : 0),
      (e) => (e.checkpoints.best ? el('a', { href: checkpointUrl(sweepId, e.trial, 'best'), download: '' }, 'best ↓') : '–')],
  ], board, 'leaderboard');
}

async function sweepView(id) {
  const mine = view;
  const d = await api(`/api/sweeps/${enc(id)}`);
  if (mine !== view) return;
  let by = 'backbone';
  const width = Math.min(1100, main.clientWidth - 20);
  const render = (data) => {
    for (const c of charts) c.destroy();
    charts = [];
    const colour = el('select', { id: 'colour-by', onchange: (ev) => { by = ev.target.value; render(data); } },
      ['backbone', 'strategy', 'split'].map((k) => el('option', { value: k, selected: k === by ? 'selected' : null }, k)));
    show(
      el('h1', {}, `${data.name} `, el('span', { class: `state-${data.state}` }, `(${data.state})`)),
      el('p', { class: 'muted', id: 'summary' }, `${data.id} · ${counts(data.counts, data.trial_count)} · started ${when(data.created_at_ms)}`,
        ...(data.tags || []).map((t) => el('span', { class: 'tag' }, t))),
      data.note ? el('p', { class: 'note', id: 'note' }, data.note.split('\n').flatMap((l, i) => (i ? [el('br'), l] : [l]))) : null,
      el('h2', {}, 'Leaderboard'), leaderboardTable(data.leaderboard, data.trials, data.id),
      el('h2', {}, 'Validation accuracy, every trial'), el('div', { class: 'toolbar' }, el('label', {}, 'colour by ', colour)),
      accuracyChart(data.trials, by, width),
      el('h2', {}, 'Backbones'), backboneBars(data.trials),
      el('h2', {}, 'Which setting mattered'), parallel(data.leaderboard),
      el('h2', {}, 'Each trial'),
      el('div', { class: 'grid' }, data.trials.map((t) => el('div', { class: 'card' },
        el('h3', {}, el('a', { href: `#/sweep/${enc(data.id)}/trial/${enc(t.trial)}` }, t.trial), ` ${t.backbone} ${lrLabel(t.lr_decay)} ${split(t.epoch_split)} — ${t.state}`),
        trialCurves(t, 310)))),
    );
  };
  render(d);
  // Live: new events of the sweep (resumed after the last one seen on a reconnect) read the
  // sweep again: at most one read at a time, at most twice a second, none once the view is left.
  let reading = false; let again = false;
  const refresh = () => {
    if (reading || refreshTimer) { again = true; return; }
    refreshTimer = setTimeout(async () => {
      refreshTimer = null; reading = true; again = false;
      try {
        const fresh = await api(`/api/sweeps/${enc(d.id)}`);
        if (mine === view) render(fresh);
      } catch (e) { if (mine === view) fail(e); }
      reading = false;
      if (again && mine === view) refresh();
    }, 500);
  };
  stream = new EventSource(`/api/sweeps/${enc(d.id)}/events?after=${d.sequence}`);
  for (const kind of ['epoch', 'trial', 'snapshot']) stream.addEventListener(kind, refresh);
  // The sweep ended: one last read, and nothing more to follow.
  stream.addEventListener('ended', () => { refresh(); if (stream) { stream.close(); stream = null; } liveBadge.hidden = true; });
  stream.onopen = () => { liveBadge.hidden = false; };
  stream.onerror = () => { liveBadge.hidden = true; };
}

async function trialView(id, trialId) {
  const mine = view;
  const t = await api(`/api/sweeps/${enc(id)}/trials/${enc(trialId)}`);
  if (mine !== view) return;
  const width = Math.min(900, main.clientWidth - 20);
  const cp = (c, name) => (c ? el('li', {}, `${name}: `,
    el('a', { href: checkpointUrl(id, t.trial, name), download: '', class: `download-${name}` }, 'download'),
    ' ', el('code', {}, c.uri), ` (epoch ${c.epoch}, ${count(c.bytes)} bytes, sha256 ${String(c.sha256).slice(0, 12)}…)`) : null);
  show(
    el('p', {}, el('a', { href: `#/sweep/${enc(id)}` }, `← sweep ${id}`)),
    el('h1', {}, `trial ${t.trial}: ${t.backbone} ${lrLabel(t.lr_decay)} ${split(t.epoch_split)} — `, el('span', { class: `state-${t.state}` }, t.state)),
    t.error ? el('p', { class: 'error' }, t.error) : null,
    el('p', { class: 'muted' }, `${count(t.parameters)} parameters · ${t.epochs_done} of ${t.epoch_split[0] + t.epoch_split[1]} epochs · ${sharedLabel(t) || 'every epoch its own'}`),
    trialCurves(t, width),
    el('h2', {}, 'Checkpoints'), el('ul', { id: 'checkpoints' }, cp(t.checkpoints.best, 'best'), cp(t.checkpoints.last, 'last')),
    el('h2', {}, 'Epochs'),
    sortable([
      ['epoch', (m) => m.epoch, null, true], ['phase', (m) => m.phase],
      ['train loss', (m) => m.train_loss, (m) => m.train_loss.toFixed(4), true], ['train acc', (m) => m.train_accuracy, (m) => pct(m.train_accuracy), true],
      ['val loss', (m) => m.val_loss, (m) => m.val_loss.toFixed(4), true], ['val acc', (m) => m.val_accuracy, (m) => pct(m.val_accuracy), true],
      ['seconds', (m) => m.seconds, (m) => m.seconds.toFixed(1), true],
      ['computed', (m) => m.reused_from || m.shared_with.join(', '), (m) => (m.reused_from ? `reused from ${m.reused_from}` : m.shared_with.length ? `shared with ${m.shared_with.join(', ')}` : '')],
    ], t.metrics, 'epochs'),
    el('h2', {}, 'Attempts'),
    sortable([
      ['attempt', (a) => a.number, null, true], ['id', (a) => a.attempt, null, true], ['worker', (a) => a.worker], ['state', (a) => a.state],
      ['started', (a) => a.started_at_ms, (a) => when(a.started_at_ms)], ['ended', (a) => a.ended_at_ms, (a) => when(a.ended_at_ms)],
      ['error', (a) => a.error],
    ], t.attempts, 'attempts'),
    el('h2', {}, 'Events'),
    el('div', { class: 'events', id: 'events' }, t.events.map((e) => el('div', {},
      `#${e.sequence} ${e.type}${e.metrics ? ` epoch ${e.metrics.epoch} val ${pct(e.metrics.val_accuracy)}` : ''}${e.trial ? ' → ' + e.trial.state : ''}${e.note ? ': ' + e.note : ''}`))),
  );
}

async function workersView() {
  const mine = view;
  const workers = await api('/api/workers');
  if (mine !== view) return;
  show(el('h1', {}, 'Workers'), workers.length === 0
    ? el('p', { class: 'muted' }, 'no workers registered; start one with sweep-worker --coordinator URL')
    : sortable([
      ['worker', (w) => w.worker], ['name', (w) => w.name],
      ['state', (w) => w.state, (w) => el('span', { class: `state-${w.state}` }, w.state)],
      ['devices', (w) => w.devices.map((d) => `${d.id} ${d.name}`).join(', ')],
      ['busy with', (w) => w.busy.map((b) => `${b.device}: ${b.sweep}/${b.trial}`).join(', ')],
      ['note', (w) => w.note || ''],
      ['last seen', (w) => w.last_seen_ms, (w) => when(w.last_seen_ms)],
    ], workers, 'workers'));
}

async function compareView(ids) {
  const mine = view;
  const sweeps = await Promise.all(ids.map((id) => api(`/api/sweeps/${enc(id)}`)));
  if (mine !== view) return;
  const rows = sweeps.flatMap((s) => s.leaderboard.map((e) => ({ ...e, sweep: s.id, sweepName: s.name })));
  rows.sort((a, b) => (b.best_val_accuracy ?? -1) - (a.best_val_accuracy ?? -1));
  show(
    el('h1', {}, `Comparing ${sweeps.length} sweeps`),
    el('ul', {}, sweeps.map((s) => el('li', {}, el('a', { href: `#/sweep/${enc(s.id)}` }, s.name), ` (${s.id}): ${counts(s.counts, s.trial_count)}`))),
    sortable([
      ['sweep', (e) => e.sweep, (e) => el('a', { href: `#/sweep/${enc(e.sweep)}` }, e.sweep)],
      ['trial', (e) => e.trial, (e) => el('a', { href: `#/sweep/${enc(e.sweep)}/trial/${enc(e.trial)}` }, e.trial)],
      ['backbone', (e) => e.backbone], ['lr decay', (e) => lrLabel(e.lr_decay)], ['split', (e) => split(e.epoch_split)],
      ['state', (e) => e.state], ['best val acc', (e) => e.best_val_accuracy, (e) => pct(e.best_val_accuracy), true],
      ['parameters', (e) => e.parameters, (e) => count(e.parameters), true],
    ], rows, 'compare'),
  );
}

// ---------------------------------------------------------------------------------------------
// Routing
// ---------------------------------------------------------------------------------------------

async function route() {
  stop();
  try {
    const parts = location.hash.replace(/^#\/?/, '').split('/').map(decodeURIComponent);
    if (parts[0] === 'sweep' && parts[1] && parts[2] === 'trial' && parts[3]) await trialView(parts[1], parts[3]);
    else if (parts[0] === 'sweep' && parts[1]) await sweepView(parts[1]);
    else if (parts[0] === 'workers') await workersView();
    else if (parts[0] === 'compare' && parts[1]) await compareView(parts[1].split(',').filter(Boolean));
    else await sweepsView();
  } catch (e) {
    fail(e);
  }
}

window.addEventListener('hashchange', route);
route();
