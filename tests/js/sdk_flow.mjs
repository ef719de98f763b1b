// End-to-end checks of the official centrifuge-js SDK (Node 20 + ws) against a
// running digis-signal server. Run by tests/integration/test_sdk_js.py.
//
// Usage: node sdk_flow.mjs <ws-url> <token-A> <token-B>
//   or env SIGNAL_WS_URL, SIGNAL_TOKEN_A, SIGNAL_TOKEN_B.
// Optional env: SIGNAL_RECOVERY_N (default 5), SIGNAL_FLOW_TIMEOUT_MS (default 20000).
// The users are read from the tokens' `sub` claims (the tokens are not verified here).
//
// Prints one JSON line per check: {"check": name, "ok": bool, ...}; exits 0 only if
// every check passed, 1 if any failed, 2 on the global timeout or bad usage.

import { Centrifuge } from 'centrifuge';
import WebSocket from 'ws';

const url = process.argv[2] || process.env.SIGNAL_WS_URL;
const tokenA = process.argv[3] || process.env.SIGNAL_TOKEN_A;
const tokenB = process.argv[4] || process.env.SIGNAL_TOKEN_B;
const N = Number(process.env.SIGNAL_RECOVERY_N || 5);
const TIMEOUT_MS = Number(process.env.SIGNAL_FLOW_TIMEOUT_MS || 20000);
const STEP_MS = 5000;

let failures = 0;
let passed = 0;

function out(obj) {
  process.stdout.write(JSON.stringify(obj) + '\n');
}

function report(check, ok, extra) {
  out({ check, ok, ...extra });
  if (ok) passed++;
  else failures++;
}

if (!url || !tokenA || !tokenB) {
  report('usage', false, { error: 'usage: node sdk_flow.mjs <ws-url> <token-A> <token-B>' });
  process.exit(2);
}

const globalTimer = setTimeout(() => {
  report('global_timeout', false, { error: `flow did not finish within ${TIMEOUT_MS} ms` });
  process.exit(2);
}, TIMEOUT_MS);

function subOf(token) {
  return JSON.parse(Buffer.from(token.split('.')[1], 'base64url').toString('utf8')).sub;
}

const userA = subOf(tokenA);
const userB = subOf(tokenB);

function fail(message, context) {
  const err = new Error(message);
  err.context = context;
  throw err;
}

function assert(cond, message, context) {
  if (!cond) fail(message, context);
}

function errInfo(e) {
  if (e instanceof Error) {
    return { error: e.message, ...(e.context !== undefined ? { context: e.context } : {}) };
  }
  return { error: e };
}

// Runs one named check. Returns true when it passed.
async function check(name, fn) {
  try {
    const detail = await fn();
    report(name, true, detail === undefined ? {} : { detail });
    return true;
  } catch (e) {
    report(name, false, errInfo(e));
    return false;
  }
}

// Records events of an emitter (client or subscription) from creation on, so a wait
// can never miss an event that fired before it started.
class Recorder {
  constructor(emitter, names) {
    this.events = [];
    this.waiters = new Set();
    for (const name of names) {
      emitter.on(name, (ctx) => {
        this.events.push({ name, ctx });
        for (const w of this.waiters) w();
      });
    }
  }

  mark() {
    return this.events.length;
  }

  of(name, since = 0) {
    return this.events.slice(since).filter((e) => e.name === name).map((e) => e.ctx);
  }

  summary(since = 0) {
    return this.events.slice(since).map((e) => [e.name, e.ctx]);
  }

  waitCount(name, count, pred = () => true, since = 0, timeoutMs = STEP_MS) {
    return new Promise((resolve, reject) => {
      const tryResolve = () => {
        const found = this.of(name, since).filter(pred);
        if (found.length >= count) {
          clearTimeout(timer);
          this.waiters.delete(tryResolve);
          resolve(found.slice(0, count));
          return true;
        }
        return false;
      };
      const timer = setTimeout(() => {
        this.waiters.delete(tryResolve);
        const found = this.of(name, since).filter(pred).length;
        const err = new Error(`${found}/${count} '${name}' events within ${timeoutMs} ms`);
        err.context = this.summary(since);
        reject(err);
      }, timeoutMs);
      if (!tryResolve()) this.waiters.add(tryResolve);
    });
  }

  async waitFor(name, pred = () => true, since = 0, timeoutMs = STEP_MS) {
    return (await this.waitCount(name, 1, pred, since, timeoutMs))[0];
  }
}

const CLIENT_EVENTS = ['connecting', 'connected', 'disconnected', 'error', 'subscribed',
  'subscribing', 'unsubscribed', 'publication', 'join', 'leave'];
const SUB_EVENTS = ['subscribing', 'subscribed', 'unsubscribed', 'publication', 'join',
  'leave', 'error'];

function newClient(token, name) {
  const client = new Centrifuge(url, {
    websocket: WebSocket,
    token,
    name,
    minReconnectDelay: 50,
    maxReconnectDelay: 500,
    timeout: STEP_MS,
  });
  const rec = new Recorder(client, CLIENT_EVENTS);
  return { client, rec };
}

function newSub(client, channel, opts) {
  const sub = client.newSubscription(channel, opts);
  const rec = new Recorder(sub, SUB_EVENTS);
  return { sub, rec };
}

async function expectReject(promise) {
  try {
    const value = await promise;
    return { rejected: false, value };
  } catch (e) {
    return { rejected: true, error: e };
  }
}

const ROOM_OPTS = { recoverable: true, positioned: true, joinLeave: true };
const room = `room:${userA}`;
const personalA = `user:#${userA}`;

const A = newClient(tokenA, 'js-flow-a');
const B = newClient(tokenB, 'js-flow-b');
let clientIdA = null;
let clientIdB = null;
let subA = null;
let subB = null;
let startOffset = null;

async function main() {
  // --- connect + server-side personal subscription ------------------------
  const connected = await check('connect', async () => {
    A.client.connect();
    const ctx = await A.rec.waitFor('connected');
    await A.client.ready(STEP_MS);
    assert(typeof ctx.client === 'string' && ctx.client.length > 0, 'no client id', ctx);
    clientIdA = ctx.client;
    return { client: ctx.client, transport: ctx.transport };
  });
  if (!connected) return;

  await check('personal_subscription', async () => {
    const ctx = await A.rec.waitFor('subscribed', (c) => c.channel === personalA);
    assert(ctx.recoverable === true, 'personal channel not recoverable', ctx);
    assert(ctx.streamPosition !== undefined, 'personal channel has no stream position', ctx);
    return ctx;
  });

  // --- client-side room subscription ---------------------------------------
  subA = newSub(A.client, room, ROOM_OPTS);
  const subscribed = await check('subscribe_room', async () => {
    subA.sub.subscribe();
    const ctx = await subA.rec.waitFor('subscribed');
    assert(ctx.recoverable === true && ctx.positioned === true, 'room not recoverable+positioned', ctx);
    assert(ctx.streamPosition && typeof ctx.streamPosition.offset === 'number', 'no stream position', ctx);
    startOffset = ctx.streamPosition.offset;
    return ctx;
  });
  if (!subscribed) return;

  await check('publish_receive_own', async () => {
    const mark = subA.rec.mark();
    await subA.sub.publish({ type: 'message', text: 'hello from js' });
    const pub = await subA.rec.waitFor('publication', (p) => p.data && p.data.text === 'hello from js', mark);
    assert(pub.info && pub.info.user === userA, `info.user is not ${userA}`, pub);
    assert(pub.info.client === clientIdA, 'info.client is not the publisher client id', pub);
    assert(pub.offset === startOffset + 1, `offset ${pub.offset} != ${startOffset + 1}`, pub);
    return pub;
  });

  // --- second client: join, cross-client publication -----------------------
  await check('second_client_join', async () => {
    const mark = subA.rec.mark();
    B.client.connect();
    const ctx = await B.rec.waitFor('connected');
    clientIdB = ctx.client;
    subB = newSub(B.client, room, ROOM_OPTS);
    subB.sub.subscribe();
    await subB.rec.waitFor('subscribed');
    const join = await subA.rec.waitFor('join', (j) => j.info && j.info.client === clientIdB, mark);
    assert(join.info.user === userB, `join info.user is not ${userB}`, join);
    return join;
  });

  await check('receive_other_client_publication', async () => {
    const mark = subA.rec.mark();
    await subB.sub.publish({ type: 'message', text: 'hello from B' });
    const pub = await subA.rec.waitFor('publication', (p) => p.data && p.data.text === 'hello from B', mark);
    assert(pub.info && pub.info.user === userB && pub.info.client === clientIdB, 'wrong info', pub);
    return pub;
  });

  // --- RPC -------------------------------------------------------------------
  await check('rpc_server_info', async () => {
    const res = await A.client.rpc('server.info', {});
    const d = res.data;
    assert(d && d.user === userA, `user is not ${userA}`, d);
    assert(d.client === clientIdA, 'client is not the caller', d);
    assert(typeof d.node === 'string' && d.node.length > 0, 'no node name', d);
    assert(Number.isInteger(d.time_ms) && Math.abs(d.time_ms - Date.now()) < 60000, 'bad time_ms', d);
    return d;
  });

  await check('rpc_unknown_method_104', async () => {
    const r = await expectReject(A.client.rpc('nope', {}));
    assert(r.rejected, 'rpc nope did not fail', r.value);
    assert(r.error.code === 104, `error code ${r.error.code} != 104`, r.error);
    return r.error;
  });

  // --- presence, presence stats, history ------------------------------------
  await check('presence', async () => {
    const res = await subA.sub.presence();
    const infos = Object.values(res.clients);
    const ids = Object.keys(res.clients);
    assert(ids.includes(clientIdA) && ids.includes(clientIdB), 'both clients not present', res);
    assert(res.clients[clientIdA].user === userA && res.clients[clientIdB].user === userB,
      'wrong users in presence', res);
    return { count: infos.length, users: infos.map((i) => i.user).sort() };
  });

  await check('presence_stats', async () => {
    const res = await subA.sub.presenceStats();
    assert(res.numClients === 2 && res.numUsers === 2, 'expected 2 clients / 2 users', res);
    return res;
  });

  await check('history', async () => {
    const all = await subA.sub.history({ limit: 10 });
    const texts = all.publications.map((p) => p.data.text);
    assert(texts.length === 2 && texts[0] === 'hello from js' && texts[1] === 'hello from B',
      'unexpected history', all);
    assert(all.offset === all.publications[1].offset, 'history offset is not the stream top', all);
    const newest = await subA.sub.history({ limit: 1, reverse: true });
    assert(newest.publications.length === 1 && newest.publications[0].data.text === 'hello from B',
      'reverse limit 1 is not the newest publication', newest);
    const since = await subA.sub.history({
      limit: 10, since: { offset: all.publications[0].offset, epoch: all.epoch },
    });
    assert(since.publications.length === 1 && since.publications[0].data.text === 'hello from B',
      'since did not return only later publications', since);
    return { offset: all.offset, epoch: all.epoch, texts };
  });

  // --- forbidden channels -------------------------------------------------
  await check('unknown_namespace_102', async () => {
    const s = newSub(A.client, 'chat:x');
    s.sub.subscribe();
    const ctx = await s.rec.waitFor('unsubscribed');
    assert(ctx.code === 102, `unsubscribed code ${ctx.code} != 102`, s.rec.summary());
    return ctx;
  });

  await check('foreign_personal_channel_103', async () => {
    const s = newSub(A.client, `user:#${userB}`);
    s.sub.subscribe();
    const ctx = await s.rec.waitFor('unsubscribed');
    assert(ctx.code === 103, `unsubscribed code ${ctx.code} != 103`, s.rec.summary());
    return ctx;
  });

  // --- recovery: A misses N publications while disconnected -----------------
  await check('recovery', async () => {
    const before = await subA.sub.history({ limit: 1, reverse: true });
    const lastSeen = before.publications[0].offset;
    const markSub = subA.rec.mark();
    const markB = subB.rec.mark();
    A.client.disconnect();
    await A.rec.waitFor('disconnected');
    await subB.rec.waitFor('leave', (l) => l.info && l.info.client === clientIdA, markB);
    for (let i = 0; i < N; i++) {
      await subB.sub.publish({ type: 'message', text: `missed ${i}` });
    }
    A.client.connect();
    const ctx = await subA.rec.waitFor('subscribed', () => true, markSub);
    assert(ctx.wasRecovering === true && ctx.recovered === true, 'not recovered', ctx);
    const pubs = await subA.rec.waitCount('publication', N, (p) => p.data && p.data.text.startsWith('missed '), markSub);
    const ns = pubs.map((p) => Number(p.data.text.split(' ')[1]));
    const offsets = pubs.map((p) => p.offset);
    for (let i = 0; i < N; i++) {
      assert(ns[i] === i, 'missed publications out of order', { ns, offsets });
      assert(offsets[i] === lastSeen + 1 + i, 'offsets not consecutive from the last seen one',
        { lastSeen, offsets });
      assert(pubs[i].info && pubs[i].info.user === userB, 'recovered publication info.user', pubs[i]);
    }
    // Nothing delivered twice.
    await new Promise((r) => setTimeout(r, 300));
    const all = subA.rec.of('publication', markSub);
    assert(all.length === N, `${all.length} publications after recovery, expected ${N}`, all);
    return { subscribed: ctx, offsets };
  });
}

try {
  await main();
} catch (e) {
  report('flow_crashed', false, errInfo(e));
} finally {
  clearTimeout(globalTimer);
  A.client.disconnect();
  B.client.disconnect();
  out({ summary: true, passed, failed: failures });
  // Let the close frames go out before exiting.
  setTimeout(() => process.exit(failures === 0 ? 0 : 1), 50);
}
