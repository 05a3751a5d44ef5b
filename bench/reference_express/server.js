'use strict';
/*
 * The benchmark's Express reference server: the same API as
 * bench/reference_starlette.py (and twistedsse), written the way Express SSE
 * servers usually are: res.writeHead + res.write per event per subscriber,
 * one Set of subscriber responses per job, child_process.spawn for the
 * renderer and readline over its stdout. One process, Node's defaults
 * (TCP_NODELAY is on by default since Node 18); no access log.
 *
 *   POST /renders              {"renderer": NAME, "params": {...}} -> 202 {id, events_url, ...}
 *   GET  /renders/:id          the job
 *   GET  /renders/:id/events   the stream: "retry:" first, then the history after
 *                              Last-Event-ID, then live "progress" events, then
 *                              "complete" (or "failed"), then the end of the response
 *   GET  /renderers, /healthz
 *
 * Renderers are commands (--renderer NAME=COMMAND, split like shlex.split),
 * spawned with the params as JSON on stdin, printing one JSON object per
 * line on stdout; each line is parsed and re-serialized (as the reference
 * and twistedsse do; JSON.parse makes integers past 2^53 doubles, so the
 * benchmark's 19-digit "t_ns" comes back rounded, by at most 128 ns: harmless
 * to latencies in ms) and becomes a "progress" event. Each event is encoded
 * once, into one string, and res.write() of that string goes to every
 * subscriber. A subscriber more than ~1000 events behind (Node's buffer for
 * it holds more than 1000 frames' worth of bytes) is dropped, as the
 * reference drops one whose 1000-event queue is full. Jobs live in memory.
 *
 * usage: node bench/reference_express/server.js --port P --renderer NAME=COMMAND [--host H] [--backlog B]
 */

const { spawn } = require('node:child_process');
const crypto = require('node:crypto');
const fs = require('node:fs');
const os = require('node:os');
const path = require('node:path');
const readline = require('node:readline');
const express = require('express');

const TERMINAL = new Set(['complete', 'failed', 'cancelled']);
const RETRY_MS = 2000;
const PING_MS = 15000;
const QUEUE_EVENTS = 1000;

/** A command line split as Python's shlex.split does (quotes, backslashes). */
function shellSplit(command) {
  const words = [];
  let word = null;
  let quote = null;
  for (let i = 0; i < command.length; i++) {
    const ch = command[i];
    if (quote === "'") {
      if (ch === "'") quote = null;
      else word += ch;
    } else if (quote === '"') {
      if (ch === '"') quote = null;
      else if (ch === '\\' && i + 1 < command.length && '"\\$`\n'.includes(command[i + 1])) word += command[++i];
      else word += ch;
    } else if (/\s/.test(ch)) {
      if (word !== null) words.push(word);
      word = null;
    } else {
      if (word === null) word = '';
      if (ch === "'" || ch === '"') quote = ch;
      else if (ch === '\\' && i + 1 < command.length) word += command[++i];
      else word += ch;
    }
  }
  if (quote) throw new Error(`unbalanced quote in ${JSON.stringify(command)}`);
  if (word !== null) words.push(word);
  return words;
}

class Job {
  constructor(renderer, params) {
    this.id = crypto.randomBytes(24).toString('base64url');
    this.renderer = renderer;
    this.params = params;
    this.state = 'running';
    this.created = Date.now() / 1000;
    this.history = []; // {name, frame}: for late subscribers and Last-Event-ID
    this.subscribers = new Set(); // http.ServerResponse
    this.progress = null;
  }

  publish(name, data) {
    // One frame, written to every subscriber's response.
    const frame = `id: ${this.history.length + 1}\nevent: ${name}\ndata: ${JSON.stringify(data)}\n\n`;
    this.history.push({ name, frame });
    const terminal = TERMINAL.has(name);
    for (const res of this.subscribers) {
      if (res.writableLength > QUEUE_EVENTS * frame.length) {
        // This far behind: dropped (the reference's queue would be full).
        this.subscribers.delete(res);
        res.destroy();
        continue;
      }
      res.write(frame);
      if (terminal) res.end();
    }
    if (terminal) this.subscribers.clear();
  }

  terminated() {
    const last = this.history[this.history.length - 1];
    return last !== undefined && TERMINAL.has(last.name);
  }

  describe() {
    return {
      id: this.id,
      renderer: this.renderer,
      state: this.state,
      progress: this.progress,
      created_at: this.created,
      status_url: `/renders/${this.id}`,
      events_url: `/renders/${this.id}/events`,
      output_url: `/renders/${this.id}/output`,
    };
  }
}

class Renders {
  constructor(renderers) {
    this.renderers = renderers; // name -> argv
    this.jobs = new Map();
    this.workdir = fs.mkdtempSync(path.join(os.tmpdir(), 'reference-express-'));
  }

  start(renderer, params) {
    const job = new Job(renderer, params);
    this.jobs.set(job.id, job);
    this.run(job).catch((err) => {
      console.error(`render ${job.id}: ${err.stack || err}`);
      if (!job.terminated()) {
        job.state = 'failed';
        job.publish('failed', { message: String(err), exit_code: null });
      }
    });
    return job;
  }

  async run(job) {
    const started = performance.now();
    const [command, ...args] = this.renderers[job.renderer];
    const child = spawn(command, args, { cwd: this.workdir, stdio: ['pipe', 'pipe', 'inherit'] });
    const exited = new Promise((resolve) => {
      child.on('error', (err) => resolve({ code: null, error: err }));
      child.on('close', (code, signal) => resolve({ code: code ?? -(os.constants.signals[signal] || 0) }));
    });
    child.stdin.on('error', () => {}); // a renderer that never reads its stdin
    child.stdin.end(JSON.stringify(job.params) + '\n');
    let problem = null;
    const lines = readline.createInterface({ input: child.stdout, crlfDelay: Infinity });
    for await (const line of lines) {
      if (!line.trim()) continue;
      let data;
      try {
        data = JSON.parse(line);
      } catch {
        data = null;
      }
      if (data === null || typeof data !== 'object' || Array.isArray(data)) {
        problem = `stdout line is not a JSON object: ${JSON.stringify(line.slice(0, 200))}`;
        child.kill('SIGKILL');
        break;
      }
      job.progress = data;
      job.publish('progress', data);
    }
    const { code, error } = await exited;
    if (problem === null && error === undefined && code === 0) {
      job.state = 'succeeded';
      job.publish('complete', { output_url: `/renders/${job.id}/output`, elapsed: (performance.now() - started) / 1000 });
    } else {
      job.state = 'failed';
      job.publish('failed', { message: problem || (error ? String(error) : `exit code ${code}`), exit_code: code });
    }
  }
}

function error(res, status, code, detail) {
  res.status(status).json({ error: code, detail });
}

function buildApp(renders) {
  const app = express();

  // Parse the body whatever its Content-Type, as the reference does.
  app.post('/renders', express.json({ type: () => true, strict: false, limit: '64kb' }), (req, res) => {
    const body = req.body;
    if (body === undefined) return error(res, 400, 'malformed_json', 'the body is not JSON');
    const params = body !== null && typeof body === 'object' ? body.params : undefined;
    if (body === null || typeof body !== 'object' || Array.isArray(body) ||
        (params !== undefined && (params === null || typeof params !== 'object' || Array.isArray(params)))) {
      return error(res, 422, 'invalid_body', 'expected {renderer, params}');
    }
    const name = body.renderer;
    if (typeof name !== 'string' || !Object.hasOwn(renders.renderers, name)) {
      return error(res, 422, 'unknown_renderer', `no renderer ${JSON.stringify(name)}`);
    }
    const job = renders.start(name, params || {});
    const description = job.describe();
    res.status(202).location(description.status_url).json(description);
  });

  app.get('/renders/:id', (req, res) => {
    const job = renders.jobs.get(req.params.id);
    if (job === undefined) return error(res, 404, 'unknown_job', 'no such render');
    res.json(job.describe());
  });

  app.get('/renders/:id/events', (req, res) => {
    const job = renders.jobs.get(req.params.id);
    if (job === undefined) return error(res, 404, 'unknown_job', 'no such render');
    const last = req.get('last-event-id') || '';
    const after = /^[0-9]{1,17}$/.test(last) ? Number(last) : 0;
    if (job.terminated() && after >= job.history.length) return res.status(204).end();
    res.writeHead(200, {
      'Content-Type': 'text/event-stream; charset=utf-8',
      'Cache-Control': 'no-store',
      Connection: 'keep-alive',
      'X-Accel-Buffering': 'no',
    });
    res.write(`retry: ${RETRY_MS}\n\n`);
    // The backlog, then subscribe: synchronous, so nothing is missed and
    // nothing comes twice.
    for (const { frame } of job.history.slice(after)) res.write(frame);
    if (job.terminated()) return res.end();
    job.subscribers.add(res);
    const ping = setInterval(() => res.write(': ping\n\n'), PING_MS);
    res.on('close', () => {
      clearInterval(ping);
      job.subscribers.delete(res);
    });
  });

  app.get('/renderers', (req, res) => {
    res.json({ renderers: Object.keys(renders.renderers).map((name) => ({ name })) });
  });

  app.get('/healthz', (req, res) => {
    let subscribers = 0;
    for (const job of renders.jobs.values()) subscribers += job.subscribers.size;
    res.json({ status: 'ok', renders: renders.jobs.size, subscribers });
  });

  // Malformed JSON (and any other error) as JSON, as the reference answers.
  app.use((err, req, res, next) => {
    if (res.headersSent) return next(err);
    if (err.type === 'entity.parse.failed') return error(res, 400, 'malformed_json', 'the body is not JSON');
    const status = err.status || err.statusCode || 500;
    error(res, status, status === 413 ? 'body_too_large' : 'error', String(err.message || err));
  });

  return app;
}

function parseArgs(argv) {
  const options = { host: '127.0.0.1', port: 8000, backlog: 2048, renderer: [] };
  for (let i = 0; i < argv.length; i++) {
    let [flag, value] = argv[i].split(/=(.*)/s, 2);
    if (value === undefined) value = argv[++i];
    if (value === undefined) throw new Error(`${flag} needs a value`);
    if (flag === '--host') options.host = value;
    else if (flag === '--port') options.port = Number(value);
    else if (flag === '--backlog') options.backlog = Number(value);
    else if (flag === '--renderer') options.renderer.push(value);
    else throw new Error(`unknown option ${flag}`);
  }
  return options;
}

function main() {
  let options;
  try {
    options = parseArgs(process.argv.slice(2));
  } catch (err) {
    console.error(`${err.message}\nusage: node server.js --port P --renderer NAME=COMMAND [--host H] [--backlog B]`);
    process.exit(2);
  }
  const renderers = {};
  for (const spec of options.renderer) {
    const at = spec.indexOf('=');
    renderers[spec.slice(0, at).trim()] = shellSplit(spec.slice(at + 1));
  }
  const app = buildApp(new Renders(renderers));
  const server = app.listen(options.port, options.host, options.backlog, () => {
    console.log(`reference-express (Node ${process.version}, Express ${require('express/package.json').version}) ` +
      `listening on ${options.host}:${options.port}`);
  });
  server.on('error', (err) => {
    console.error(err.stack || String(err));
    process.exit(1);
  });
}

main();
