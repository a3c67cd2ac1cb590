// ferry's live cluster view. One event stream (/api/v1/events) brings every node's view once a
// second, with only the flow events new since the last; the page keeps the recent flows and draws
// nodes, tunnels, pods grouped by namespace and the flows between them. preact + htm (npm's htm
// 3.1.1, web/vendor): components, no build step.
import { html, render, useEffect, useState } from './vendor/htm-preact-standalone.module.js';

const token = new URLSearchParams(location.search).get('access_token');
const withToken = (path) => (token ? `${path}${path.includes('?') ? '&' : '?'}access_token=${encodeURIComponent(token)}` : path);

/// Flow events kept (newest last), and how long a flow stays on the map after its last event.
const KEEP_FLOWS = 400;
const MAP_SECONDS = 15;

const podName = (p) => (p.namespace && p.name ? `${p.namespace}/${p.name}` : p.id);
const endpoint = (pod, ip, port) => `${pod || ip || '?'}${port ? `:${port}` : ''}`;
const PROTO = { 1: 'icmp', 6: 'tcp', 17: 'udp', 58: 'icmpv6', 132: 'sctp' };
const rate = (x) => (x >= 1e9 ? `${(x / 1e9).toFixed(2)} G` : x >= 1e6 ? `${(x / 1e6).toFixed(2)} M` : x >= 1e3 ? `${(x / 1e3).toFixed(1)} k` : `${Math.round(x)} `);
const clock = (t) => new Date(t * 1000).toLocaleTimeString();

/// Merges a `cluster` event into the state: the nodes replaced, the flow events appended. A node
/// names only its own pods in its events; the page knows every node's, so it names the other end too.
function merge(state, view) {
  const byAddr = new Map();
  for (const n of view.nodes) for (const p of n.view ? n.view.status.pods : []) for (const a of p.addrs || []) byAddr.set(a, podName(p));
  const flows = state.flows.slice();
  const seen = new Set(flows.map((f) => `${f.node}#${f.seq}`));
  for (const n of view.nodes) {
    for (const e of n.view ? n.view.flows.events : []) {
      const key = `${n.node}#${e.seq}`;
      if (!seen.has(key)) {
        seen.add(key);
        flows.push({ ...e, node: e.node || n.node, src_pod: e.src_pod || byAddr.get(e.src), dst_pod: e.dst_pod || byAddr.get(e.dst) });
      }
    }
  }
  flows.sort((a, b) => a.time - b.time);
  return { from: view.from, nodes: view.nodes, flows: flows.slice(-KEEP_FLOWS), updated: Date.now() / 1000 };
}

/// Where each node and pod goes on the map.
function layout(nodes) {
  const W = 260, GAP = 60, POD = 34;
  const boxes = [], pods = new Map();
  let x = 20;
  for (const n of nodes) {
    const list = n.view ? n.view.status.pods : [];
    const byNs = new Map();
    for (const p of list) {
      const ns = p.namespace || '(no namespace)';
      if (!byNs.has(ns)) byNs.set(ns, []);
      byNs.get(ns).push(p);
    }
    const groups = [];
    let y = 70;
    for (const [ns, ps] of [...byNs].sort()) {
      const rows = Math.ceil(ps.length / 4);
      const g = { ns, y, h: 22 + rows * (POD + 18), pods: [] };
      ps.sort((a, b) => podName(a).localeCompare(podName(b))).forEach((p, i) => {
        const pos = { x: x + 35 + (i % 4) * 60, y: y + 34 + Math.floor(i / 4) * (POD + 18), node: n.node, pod: p };
        g.pods.push(pos);
        pods.set(podName(p), pos);
        for (const a of p.addrs || []) pods.set(a, pos);
      });
      groups.push(g);
      y += g.h + 10;
    }
    boxes.push({ entry: n, x, y: 10, w: W, h: Math.max(y, 120), groups });
    x += W + GAP;
  }
  const height = Math.max(160, ...boxes.map((b) => b.h + 20));
  return { boxes, pods, width: Math.max(x, 600), height };
}

function ClusterMap({ state, now, picked, pick }) {
  const { boxes, pods, width, height } = layout(state.nodes);
  const at = new Map(boxes.map((b) => [b.entry.node, b]));
  const tunnels = [];
  const drawn = new Set();
  for (const b of boxes) {
    for (const r of b.entry.view ? b.entry.view.routes.remote : []) {
      const o = at.get(r.node);
      const key = [b.entry.node, r.node].sort().join('|');
      if (o && !drawn.has(key)) {
        drawn.add(key);
        tunnels.push(html`<line class="tunnel" x1=${b.x + b.w / 2} y1=${b.y + 30} x2=${o.x + o.w / 2} y2=${o.y + 30}><title>${r.tunnel} tunnel ${b.entry.node} ↔ ${r.node} (VNI ${r.vni})</title></line>`);
      }
    }
  }
  const recent = state.flows.filter((f) => now - f.time < MAP_SECONDS);
  const dropping = new Set(recent.filter((f) => f.verdict === 'dropped').map((f) => f.src_pod || f.src));
  const lines = [];
  const pairs = new Set();
  for (const f of recent) {
    const a = pods.get(f.src_pod) || pods.get(f.src);
    if (!a) continue;
    const b = pods.get(f.dst_pod) || pods.get(f.dst);
    const key = `${f.src_pod || f.src}>${f.dst_pod || f.dst}>${f.verdict}`;
    if (pairs.has(key)) continue;
    pairs.add(key);
    const [x2, y2] = b ? [b.x, b.y] : [a.x + 40, a.y - 30];
    const mid = `${(a.x + x2) / 2},${Math.min(a.y, y2) - 40}`;
    lines.push(html`<path class="flow ${f.verdict}" d="M${a.x},${a.y} Q${mid} ${x2},${y2}"
      data-flow=${f.verdict} data-src=${f.src_pod || f.src} data-dst=${f.dst_pod || f.dst}>
      <title>${endpoint(f.src_pod, f.src, f.sport)} → ${endpoint(f.dst_pod, f.dst, f.dport)} ${PROTO[f.proto] || ''}: ${f.verdict}${f.reason ? ` (${f.reason})` : ''} at ${f.stage}${f.policy ? ` (policy ${f.policy})` : ''}</title></path>`);
  }
  return html`<svg class="map" viewBox="0 0 ${width} ${height}" width=${width} height=${height}>
    ${tunnels}
    ${boxes.map((b) => html`<g class="node ${b.entry.view ? '' : 'unreachable'}" data-node=${b.entry.node}>
      <rect x=${b.x} y=${b.y} width=${b.w} height=${b.h} rx="8"></rect>
      <text class="name" x=${b.x + 10} y=${b.y + 20}>${b.entry.node}</text>
      <text class="small" x=${b.x + 10} y=${b.y + 36}>${b.entry.view ? `${b.entry.view.status.node.underlay_addr} · ${b.entry.view.status.node.tunnel} · ${b.entry.view.status.ready ? 'ready' : 'not ready'}` : b.entry.error}</text>
      ${b.groups.map((g) => html`<g data-namespace=${g.ns}>
        <rect class="ns" x=${b.x + 8} y=${g.y} width=${b.w - 16} height=${g.h} rx="6"></rect>
        <text class="small" x=${b.x + 14} y=${g.y + 14}>namespace ${g.ns}</text>
        ${g.pods.map((p) => html`<g class="pod ${dropping.has(podName(p.pod)) || (p.pod.addrs || []).some((a) => dropping.has(a)) ? 'dropping' : ''} ${picked.some((q) => podName(q) === podName(p.pod)) ? 'picked' : ''}"
          data-pod=${podName(p.pod)} onClick=${() => pick(p.pod)}>
          <circle cx=${p.x} cy=${p.y} r="12"></circle>
          <text class="small" x=${p.x} y=${p.y + 26} text-anchor="middle">${p.pod.name || p.pod.id}</text>
          <title>${podName(p.pod)} ${(p.pod.addrs || []).join(' ')}</title></g>`)}
      </g>`)}
    </g>`)}
    ${lines}
  </svg>`;
}

function NodeCard({ entry }) {
  if (!entry.view) return html`<div class="card" data-node-card=${entry.node}><h2>${entry.node}</h2><p class="down">${entry.error}</p></div>`;
  const { stats } = entry.view;
  const drops = Object.entries(stats.drops).filter(([, n]) => n > 0).sort((a, b) => b[1] - a[1]);
  return html`<div class="card" data-node-card=${entry.node}>
    <h2>${entry.node} <span class="muted">ports</span></h2>
    <table><tr><th>port</th><th>kind</th><th class="num">rx pkt/s</th><th class="num">tx pkt/s</th><th class="num">rx bit/s</th><th class="num">tx bit/s</th></tr>
      ${stats.ports.map((p) => html`<tr><td>${p.pod || p.ifname}</td><td>${p.kind}</td><td class="num">${rate(p.rx_pps)}</td><td class="num">${rate(p.tx_pps)}</td><td class="num">${rate(p.rx_bps)}</td><td class="num">${rate(p.tx_bps)}</td></tr>`)}
    </table>
    <h2>${entry.node} <span class="muted">drops by reason</span></h2>
    ${drops.length === 0
      ? html`<p class="muted">none</p>`
      : html`<table><tr><th>reason</th><th class="num">total</th><th class="num">per second</th></tr>
        ${drops.map(([r, n]) => html`<tr class=${(stats.drop_rates[r] || 0) > 0 ? 'hot' : ''} data-drop-reason=${r}><td>${r}</td><td class="num">${n}</td><td class="num">${(stats.drop_rates[r] || 0).toFixed(1)}</td></tr>`)}</table>`}
  </div>`;
}

function Flows({ flows }) {
  const last = flows.slice(-60).reverse();
  return html`<table class="flows">
    <tr><th>last seen</th><th>node</th><th>event</th><th>source</th><th>destination</th><th>proto</th><th>verdict</th><th>stage</th><th class="num">packets</th><th class="num">bytes</th></tr>
    ${last.map((f) => html`<tr class=${f.verdict} data-verdict=${f.verdict} data-src=${f.src_pod || f.src} data-dst=${f.dst_pod || f.dst} data-reason=${f.reason || ''}>
      <td>${clock(f.time)}</td><td>${f.node}</td><td>${f.kind === 'drop' ? 'drop (first bytes kept)' : 'flow'}</td><td>${endpoint(f.src_pod, f.src, f.sport)}</td><td>${endpoint(f.dst_pod, f.dst, f.dport)}</td>
      <td>${PROTO[f.proto] || f.proto || ''}</td><td>${f.verdict}${f.reason ? `: ${f.reason}` : ''}</td><td>${f.stage}${f.policy ? html` <span class="muted">(policy ${f.policy})</span>` : ''}</td>
      <td class="num">${f.packets}</td><td class="num">${f.bytes}</td></tr>`)}
  </table>`;
}

/// `ferry trace` between the two pods clicked on the map: each node's stages and the verdict.
/// A pod is traced by its address (IPv4 first): a node knows its own pods' names, not always the
/// other nodes'.
const addrOf = (pod) => (pod.addrs || []).slice().sort((a, b) => a.includes(':') - b.includes(':'))[0];

function Trace({ picked, clear }) {
  const [proto, setProto] = useState('tcp');
  const [port, setPort] = useState('80');
  const [result, setResult] = useState(null);
  const [srcPod, dstPod] = picked;
  const [src, dst] = [srcPod && addrOf(srcPod), dstPod && addrOf(dstPod)];
  useEffect(() => {
    if (!src || !dst) { setResult(null); return; }
    const q = new URLSearchParams({ src, dst, proto, ...(proto === 'icmp' || !port ? {} : { port }) });
    setResult({ pending: true });
    fetch(withToken(`/api/v1/trace?${q}`))
      .then(async (r) => (r.ok ? { report: await r.json() } : { error: await r.text() }))
      .catch((e) => ({ error: String(e) }))
      .then(setResult);
  }, [src, dst, proto, port]);
  return html`<div class="trace card">
    <h2>Trace <span class="muted">click a source pod, then a destination pod, on the map</span></h2>
    <p>from <b>${srcPod ? `${podName(srcPod)} (${src})` : '…'}</b> to <b>${dstPod ? `${podName(dstPod)} (${dst})` : '…'}</b>
      <select onChange=${(e) => setProto(e.target.value)}>${['tcp', 'udp', 'icmp'].map((p) => html`<option value=${p} selected=${p === proto}>${p}</option>`)}</select>
      ${proto === 'icmp' ? '' : html` port <input size="5" value=${port} onChange=${(e) => setPort(e.target.value)} />`}
      ${src ? html` <button onClick=${clear}>clear</button>` : ''}</p>
    ${result && result.pending ? html`<p class="muted">tracing…</p>` : ''}
    ${result && result.error ? html`<p class="down" data-trace-error>${result.error}</p>` : ''}
    ${result && result.report ? html`<div data-trace-delivered=${String(result.report.delivered)}>
      <p class=${result.report.delivered ? 'live' : 'down'}><b>${result.report.verdict}</b></p>
      <table><tr><th>node</th><th>stage</th><th>result</th><th>detail</th></tr>
        ${result.report.halves.flatMap((h) => h.stages.map((st) => html`<tr class=${st.result === 'dropped' || st.result === 'denied' ? 'dropped' : ''}>
          <td>${h.node}</td><td>${st.stage}</td><td>${st.result}</td><td>${st.detail}</td></tr>`))}
      </table></div>` : ''}
  </div>`;
}

function App() {
  const [state, setState] = useState({ from: '', nodes: [], flows: [], updated: 0 });
  const [live, setLive] = useState(false);
  const [now, setNow] = useState(Date.now() / 1000);
  const [picked, setPicked] = useState([]);
  const pick = (pod) => setPicked((p) => (p.length >= 2 ? [pod] : p[0] && podName(p[0]) === podName(pod) ? p : [...p, pod]));
  useEffect(() => {
    const es = new EventSource(withToken('/api/v1/events'));
    es.addEventListener('cluster', (m) => {
      setState((s) => merge(s, JSON.parse(m.data)));
      setNow(Date.now() / 1000);
      setLive(true);
    });
    es.onerror = () => setLive(false); // EventSource reconnects on its own
    return () => es.close();
  }, []);
  const pods = state.nodes.reduce((n, e) => n + (e.view ? e.view.status.pods.length : 0), 0);
  const flowsOn = state.nodes.some((e) => e.view && e.view.flows.enabled);
  const lost = state.nodes.reduce((n, e) => n + (e.view ? e.view.flows.lost_records + e.view.flows.lost_drop_events : 0), 0);
  return html`<header>
      <h1>ferry</h1>
      <span>cluster view from <b>${state.from || '…'}</b></span>
      <span data-count="nodes">${state.nodes.length} nodes</span>
      <span data-count="pods">${pods} pods</span>
      <span class=${live ? 'live' : 'down'} data-live=${live}>${live ? '● live' : '○ reconnecting'}</span>
      <span class="muted">${state.updated ? `updated ${clock(state.updated)}` : ''}</span>
    </header>
    <main>
      <h2>Nodes, tunnels, pods and the flows of the last ${MAP_SECONDS} s</h2>
      <${ClusterMap} state=${state} now=${now} picked=${picked} pick=${pick} />
      <${Trace} picked=${picked} clear=${() => setPicked([])} />
      <div class="nodes">${state.nodes.map((e) => html`<${NodeCard} entry=${e} />`)}</div>
      <h2>Flows <span class="muted">${flowsOn ? `(newest first; ${lost} events lost by the workers)` : '(flow records are off on every node: dataplane.flows)'}</span></h2>
      <${Flows} flows=${state.flows} />
    </main>`;
}

const root = document.getElementById('app');
root.textContent = ''; // the "loading" line
render(html`<${App} />`, root);
