/*
 * twistedsse demo page.
 *
 * Plain ES2017, no build step, no dependencies. Runs under a strict CSP
 * (script-src 'self', style-src 'self'): no inline code, no style
 * attributes, no eval. Every string that comes from the server or the user
 * reaches the DOM through textContent or an attribute, never innerHTML.
 *
 * All URLs are relative (the page may be mounted under a sub-path), and
 * the URLs the API returns (status_url, events_url, output_url) are used
 * exactly as given.
 *
 * window.twistedsse is the hook for automated browser tests; see the
 * comment above `api` below.
 *
 * Authentication: when the server asks for a token, the page sends the one
 * in its "Access token" field as `Authorization: Bearer` on POST and
 * DELETE, never in a URL. The field is kept in sessionStorage (this tab
 * only). An app's backend can hand the page a short-lived scoped token in
 * the URL fragment, `#access_token=TOKEN`: a fragment is never sent to any
 * server (nor in a Referer), and the page moves it into the field and
 * removes it from the address at once. Reading a render (its events,
 * status and output) needs only its id.
 */
(function () {
  "use strict";

  var TERMINAL = { complete: "succeeded", failed: "failed", cancelled: "cancelled" };
  var SSE_EVENTS = ["progress", "retrying", "reset", "complete", "failed", "cancelled", "message"];
  var LOG_LINES = 50;
  // The built-in card renderer's params, as sent; also the ids of its fields.
  var CARD_FIELDS = ["title", "subtitle", "duration", "size", "fps", "background", "foreground", "accent"];
  var TOKEN_KEY = "twistedsse.access_token";

  // ---------------------------------------------------------------- helpers

  function $(id) {
    return document.getElementById(id);
  }

  function now() {
    // Milliseconds since the epoch with sub-millisecond precision.
    return performance.timeOrigin + performance.now();
  }

  function isNum(x) {
    return typeof x === "number" && isFinite(x);
  }

  function show(el, visible) {
    el.hidden = !visible;
  }

  function clearChildren(el) {
    while (el.firstChild) el.removeChild(el.firstChild);
  }

  function mmss(seconds) {
    var s = Math.max(0, Math.round(seconds));
    var m = Math.floor(s / 60);
    s = s % 60;
    return (m < 10 ? "0" : "") + m + ":" + (s < 10 ? "0" : "") + s;
  }

  function humanBytes(n) {
    if (!isNum(n)) return null;
    var units = ["B", "KiB", "MiB", "GiB"];
    var i = 0;
    while (n >= 1024 && i < units.length - 1) {
      n /= 1024;
      i += 1;
    }
    return (i === 0 ? String(n) : n.toFixed(1)) + " " + units[i];
  }

  function clockTime(ms) {
    var d = new Date(ms);
    function pad(n, w) {
      n = String(n);
      while (n.length < w) n = "0" + n;
      return n;
    }
    return pad(d.getHours(), 2) + ":" + pad(d.getMinutes(), 2) + ":" +
      pad(d.getSeconds(), 2) + "." + pad(d.getMilliseconds(), 3);
  }

  function parseJSON(text) {
    try {
      return JSON.parse(text);
    } catch (e) {
      return text;
    }
  }

  function deferred() {
    var d = { settled: false, claimed: false };
    d.promise = new Promise(function (resolve, reject) {
      d.resolve = function (v) {
        if (!d.settled) { d.settled = true; resolve(v); }
      };
      d.reject = function (err) {
        if (!d.settled) { d.settled = true; reject(err); }
      };
    });
    // A rejection nobody awaits must not show up as an unhandled error;
    // whoever awaits `done` still sees it.
    d.promise.catch(function () {});
    return d;
  }

  // An Error carrying the API's {"error": CODE, "detail": TEXT}.
  function apiError(status, body, fallback) {
    var detail = body && typeof body === "object" && typeof body.detail === "string"
      ? body.detail : fallback;
    var err = new Error(detail);
    err.status = status;
    err.code = body && typeof body === "object" ? body.error : undefined;
    err.detail = detail;
    return err;
  }

  function requestJSON(method, url, body) {
    var init = { method: method, headers: { Accept: "application/json" }, credentials: "same-origin" };
    var token = ui.token ? ui.token.value.trim() : "";
    if (token && method !== "GET") init.headers.Authorization = "Bearer " + token;
    if (body !== undefined) {
      init.headers["Content-Type"] = "application/json";
      init.body = JSON.stringify(body);
    }
    return fetch(url, init).then(
      function (res) {
        return res.text().then(function (text) {
          var data = null;
          if (text) {
            try { data = JSON.parse(text); } catch (e) { data = null; }
          }
          if (!res.ok) {
            throw apiError(res.status, data, "HTTP " + res.status + " " + (res.statusText || "error"));
          }
          return data;
        });
      },
      function (netErr) {
        throw apiError(0, null, "Network error: could not reach the server (" + netErr.message + ").");
      }
    );
  }

  // ----------------------------------------------------------------- the api

  /*
   * window.twistedsse
   *   events      SSE events of the current job, in arrival order:
   *               {type, id: e.lastEventId, data: <parsed JSON>, receivedAt}
   *               (receivedAt: ms since the epoch, sub-ms precision).
   *               Emptied (in place) by each start().
   *   state       null, then the job state: queued | running | succeeded |
   *               failed | cancelled.
   *   job         the job object returned by POST renders (or null).
   *   connections EventSource `open` events for the current job.
   *   reconnects  EventSource `error` events while not CLOSED (blips).
   *   renderers   the list from GET renderers, once loaded.
   *   start(renderer, params) -> Promise<job>   (rejects with an Error
   *               having .status, .code, .detail on an API error)
   *   cancel()    -> Promise (DELETE status_url)
   *   done        Promise resolving with the terminal event
   *               ({type, id, data, receivedAt}) when the current job ends;
   *               a fresh promise on each start(). It rejects if the POST
   *               fails or the stream is lost for good (EventSource CLOSED);
   *               a job superseded by a newer start() resolves its old
   *               promise with {type: "superseded", ...}.
   */
  var doneD = deferred();
  var api = {
    events: [],
    state: null,
    job: null,
    connections: 0,
    reconnects: 0,
    renderers: [],
    done: doneD.promise,
    start: start,
    cancel: cancel
  };
  window.twistedsse = api;

  var current = null; // the job being shown: {job, es, done}
  var seq = 0;

  // ------------------------------------------------------------------- the UI

  var ui = {};

  function bindUI() {
    [
      "render-form", "renderer", "renderer-desc", "card-fields", "json-fields",
      "params-json", "form-error", "start", "title", "subtitle", "duration",
      "fps", "size", "background", "foreground", "accent",
      "job-state", "announce", "job-id", "job-renderer", "conn-state",
      "percent", "progress", "stat-frame", "frame", "stat-fps", "fps-value",
      "stat-speed", "speed", "stat-time", "out-time", "stat-eta", "eta",
      "cancel", "result", "video", "result-info", "download", "failure",
      "failure-message", "failure-detail", "stderr", "cancelled",
      "cancelled-message", "log", "log-count", "token", "notice"
    ].forEach(function (id) {
      ui[id] = $(id);
    });
  }

  function announce(text) {
    ui.announce.textContent = text;
  }

  function setState(state) {
    var changed = api.state !== state;
    api.state = state;
    var label = state || "idle";
    ui["job-state"].textContent = label;
    ui["job-state"].setAttribute("data-state", label);
    ui.cancel.disabled = !(current && (state === "queued" || state === "running"));
    var id = current ? current.job.id : "";
    var text = {
      queued: "Render " + id + " is queued.",
      running: "Render " + id + " is running.",
      succeeded: "Render " + id + " finished.",
      failed: "Render " + id + " failed.",
      cancelled: "Render " + id + " was cancelled."
    }[state];
    if (text && changed) announce(text);
  }

  function setConn(kind, text) {
    ui["conn-state"].textContent = text;
    ui["conn-state"].setAttribute("data-conn", kind);
  }

  function setFormError(text, field) {
    var fields = ui["render-form"].querySelectorAll("[aria-invalid]");
    for (var i = 0; i < fields.length; i++) fields[i].removeAttribute("aria-invalid");
    ui["form-error"].textContent = text || "";
    show(ui["form-error"], Boolean(text));
    if (field) {
      field.setAttribute("aria-invalid", "true");
      field.focus();
    }
  }

  function resetPanel() {
    ui["job-id"].textContent = "—";
    ui["job-renderer"].textContent = "—";
    setConn("none", "—");
    setPercent(0);
    ["stat-frame", "stat-fps", "stat-speed", "stat-time", "stat-eta"].forEach(function (id) {
      show(ui[id], false);
    });
    show(ui.result, false);
    show(ui.failure, false);
    show(ui.cancelled, false);
    ui.video.pause();
    ui.video.removeAttribute("src");
    ui.video.load();
    show(ui.video, false);
    ui.download.removeAttribute("href");
    show(ui.download, false);
    ui["result-info"].textContent = "";
    ui["failure-message"].textContent = "";
    ui["failure-detail"].textContent = "";
    ui.stderr.textContent = "";
    show(ui.stderr, false);
    ui["cancelled-message"].textContent = "";
    setNotice(null, "");
    clearChildren(ui.log);
    ui["log-count"].textContent = "(0)";
    ui.cancel.disabled = true;
  }

  function setPercent(pct) {
    if (isNum(pct)) {
      pct = Math.min(100, Math.max(0, pct));
      ui.progress.value = pct;
      ui.progress.textContent = pct.toFixed(1) + " %";
      ui.percent.textContent = pct.toFixed(1) + " %";
    } else {
      // Indeterminate: a <progress> without a value attribute.
      ui.progress.removeAttribute("value");
      ui.progress.textContent = "in progress";
      ui.percent.textContent = "in progress";
    }
  }

  // A notice under the bar: what happened to the stream or the render that
  // is neither progress nor an outcome (kind: "retrying", "reset"; null
  // hides it).
  function setNotice(kind, text) {
    ui.notice.textContent = text;
    ui.notice.setAttribute("data-kind", kind || "none");
    show(ui.notice, Boolean(kind));
  }

  function setStat(id, valueId, text) {
    var known = text !== null && text !== undefined && text !== "";
    show(ui[id], known);
    if (known) ui[valueId].textContent = text;
  }

  function logLine(type, id, receivedAt, data) {
    var li = document.createElement("li");
    li.setAttribute("data-type", type);
    var time = document.createElement("span");
    time.className = "log-time";
    time.textContent = clockTime(receivedAt);
    var kind = document.createElement("span");
    kind.className = "log-type";
    kind.textContent = type + (id ? " #" + id : "");
    var body = document.createElement("span");
    body.className = "log-data";
    body.textContent = typeof data === "string" ? data : JSON.stringify(data);
    li.appendChild(time);
    li.appendChild(kind);
    li.appendChild(body);
    var atBottom = ui.log.scrollTop + ui.log.clientHeight >= ui.log.scrollHeight - 4;
    ui.log.appendChild(li);
    while (ui.log.childNodes.length > LOG_LINES) ui.log.removeChild(ui.log.firstChild);
    var n = api.events.length;
    ui["log-count"].textContent = n > LOG_LINES ? "(" + n + ", last " + LOG_LINES + " shown)" : "(" + n + ")";
    if (atBottom) ui.log.scrollTop = ui.log.scrollHeight;
  }

  // -------------------------------------------------------------- rendering

  function onProgress(data) {
    if (api.state === "queued" || api.state === null) setState("running");
    if (!data || typeof data !== "object") {
      setPercent(null);
      return;
    }
    var pct = null;
    if (isNum(data.percent)) pct = data.percent;
    else if (isNum(data.progress)) pct = data.progress * 100;
    setPercent(pct);

    var frame = null;
    if (isNum(data.frame)) {
      frame = String(data.frame) + (isNum(data.total_frames) ? " / " + data.total_frames : "");
    }
    setStat("stat-frame", "frame", frame);
    setStat("stat-fps", "fps-value", isNum(data.fps) ? (Math.round(data.fps * 10) / 10).toString() : null);
    var speed = null;
    if (isNum(data.speed)) speed = (Math.round(data.speed * 100) / 100) + "×";
    else if (typeof data.speed === "string" && data.speed) speed = data.speed;
    setStat("stat-speed", "speed", speed);
    var outTime = null;
    if (isNum(data.out_time)) outTime = mmss(data.out_time);
    else if (typeof data.out_time === "string" && data.out_time) outTime = data.out_time;
    setStat("stat-time", "out-time", outTime);
    setStat("stat-eta", "eta", isNum(data.eta) ? mmss(data.eta) : null);
  }

  // Redis mode: the worker running the render was lost (or handed it
  // back), and another starts it again from the beginning. Not an error:
  // the job is still running, and its progress starts again from 0.
  function onRetrying(data) {
    data = data && typeof data === "object" ? data : {};
    setState("running");
    setPercent(0);
    ["stat-frame", "stat-fps", "stat-speed", "stat-time", "stat-eta"].forEach(function (id) {
      show(ui[id], false);
    });
    var text = "Starting again";
    if (isNum(data.attempt)) {
      text += ": attempt " + data.attempt + (isNum(data.max_attempts) ? " of at most " + data.max_attempts : "");
    }
    text += ".";
    if (typeof data.message === "string" && data.message) text += " " + data.message + ".";
    setNotice("retrying", text);
    announce("Render " + (current ? current.job.id : "") + " is starting again.");
  }

  // The stream could not give every event since the last one seen: more
  // were published than the server keeps (missed: how many), or, in Redis
  // mode, Redis lost the job's events (missed: null). What follows is the
  // job as it is now.
  function onReset(data) {
    data = data && typeof data === "object" ? data : {};
    var text;
    if (isNum(data.missed)) {
      text = "Missed " + data.missed + " event" + (data.missed === 1 ? "" : "s") +
        " (older than the server keeps); showing the render as it is now.";
    } else {
      text = "The server lost this render's earlier events; showing the render as it is now.";
    }
    setNotice("reset", text);
    if (data.state === "queued" || data.state === "running") setState(data.state);
    if (data.progress && typeof data.progress === "object") onProgress(data.progress);
  }

  function onComplete(data) {
    data = data && typeof data === "object" ? data : {};
    setPercent(100);
    show(ui["stat-eta"], false);
    var bits = [];
    if (isNum(data.duration)) bits.push("Video length " + data.duration.toFixed(1) + " s");
    var size = humanBytes(data.size);
    if (size) bits.push(size);
    if (isNum(data.elapsed)) bits.push("rendered in " + data.elapsed.toFixed(1) + " s");
    if (typeof data.output_url === "string" && data.output_url) {
      ui.video.setAttribute("src", data.output_url);
      show(ui.video, true);
      ui.download.setAttribute("href", data.output_url);
      var name = current && current.job && current.job.id ? "render-" + current.job.id + ".mp4" : "render.mp4";
      ui.download.setAttribute("download", name);
      show(ui.download, true);
    } else {
      bits.push("this renderer produced no file");
    }
    ui["result-info"].textContent = bits.length ? bits.join(" · ") + "." : "";
    show(ui.result, true);
    setState("succeeded");
  }

  function onFailed(data) {
    settleIndeterminate();
    data = data && typeof data === "object" ? data : {};
    ui["failure-message"].textContent =
      typeof data.message === "string" && data.message ? data.message : "The render failed.";
    var detail = [];
    if (data.exit_code !== null && data.exit_code !== undefined) detail.push("exit code " + data.exit_code);
    if (data.signal !== null && data.signal !== undefined) detail.push("signal " + data.signal);
    ui["failure-detail"].textContent = detail.join(", ");
    var tail = Array.isArray(data.stderr_tail) ? data.stderr_tail : [];
    ui.stderr.textContent = tail.map(String).join("\n");
    show(ui.stderr, tail.length > 0);
    show(ui.failure, true);
    setState("failed");
  }

  // A job that ended without a percentage leaves no spinning bar behind.
  function settleIndeterminate() {
    if (!ui.progress.hasAttribute("value")) {
      ui.progress.value = 0;
      ui.progress.textContent = "–";
      ui.percent.textContent = "–";
    }
    show(ui["stat-eta"], false);
  }

  function onCancelled(data) {
    settleIndeterminate();
    data = data && typeof data === "object" ? data : {};
    ui["cancelled-message"].textContent =
      typeof data.message === "string" && data.message ? data.message : "The render was cancelled.";
    show(ui.cancelled, true);
    setState("cancelled");
  }

  // ------------------------------------------------------------------- SSE

  function closeCurrent(reason) {
    if (!current) return;
    if (current.es) current.es.close();
    current.es = null;
    if (current.done && !current.done.settled) {
      current.done.resolve({ type: reason, id: "", data: { job: current.job && current.job.id }, receivedAt: now() });
    }
  }

  function listen(run) {
    var es = new EventSource(run.job.events_url);
    run.es = es;
    setConn("connecting", "connecting…");

    es.addEventListener("open", function () {
      if (run !== current) return;
      api.connections += 1;
      setConn("open", api.connections > 1 ? "connected (resumed)" : "connected");
    });

    es.addEventListener("error", function () {
      if (run !== current || run.es !== es) return;
      if (es.readyState === EventSource.CLOSED) {
        // The browser gave up (HTTP error, wrong content type, ...).
        setConn("lost", "connection lost");
        announce("Lost the connection to the progress stream of render " + run.job.id + ".");
        run.es = null;
        var err = new Error("connection lost");
        err.code = "connection_lost";
        run.done.reject(err);
        refreshStatus(run);
      } else {
        // A blip: the browser reconnects by itself with Last-Event-ID.
        api.reconnects += 1;
        setConn("reconnecting", "reconnecting…");
      }
    });

    SSE_EVENTS.forEach(function (type) {
      es.addEventListener(type, function (e) {
        var receivedAt = now();
        if (run !== current) return;
        var ev = { type: type, id: e.lastEventId, data: parseJSON(e.data), receivedAt: receivedAt };
        api.events.push(ev);
        logLine(type, ev.id, receivedAt, ev.data);
        if (type === "progress") onProgress(ev.data);
        else if (type === "retrying") onRetrying(ev.data);
        else if (type === "reset") onReset(ev.data);
        else if (type === "complete") onComplete(ev.data);
        else if (type === "failed") onFailed(ev.data);
        else if (type === "cancelled") onCancelled(ev.data);
        if (TERMINAL[type]) {
          // Otherwise the browser would reconnect once the server closes.
          es.close();
          run.es = null;
          setConn("closed", "closed");
          run.done.resolve(ev);
        }
      });
    });
  }

  // After the stream is lost, show what the server says about the job.
  function refreshStatus(run) {
    if (!run.job.status_url) return;
    requestJSON("GET", run.job.status_url).then(function (status) {
      if (run !== current || !status || typeof status.state !== "string") return;
      if (status.progress && status.state === "running") onProgress(status.progress);
      if (status.state === "succeeded" && status.result) onComplete(status.result);
      else if (status.state === "failed" && status.error) onFailed(status.error);
      else setState(status.state);
    }, function () {});
  }

  // -------------------------------------------------------------- actions

  function start(renderer, params) {
    if (renderer === undefined || renderer === null || renderer === "") renderer = "card";
    if (params === undefined || params === null) params = {};

    // Stop listening to the previous job (it keeps running on the server).
    closeCurrent("superseded");
    current = null;
    if (doneD.claimed || doneD.settled) doneD = deferred();
    doneD.claimed = true;
    api.done = doneD.promise;
    var d = doneD;

    api.events.length = 0;
    api.connections = 0;
    api.reconnects = 0;
    api.job = null;
    api.state = null;
    resetPanel();
    setFormError("");
    ui["job-state"].textContent = "starting";
    ui["job-state"].setAttribute("data-state", "starting");
    ui["job-renderer"].textContent = String(renderer);
    announce("Starting a " + renderer + " render…");
    var myTicket = ++seq;

    return requestJSON("POST", "renders", { renderer: renderer, params: params }).then(
      function (job) {
        if (myTicket !== seq) {
          // A newer start() superseded this one while the POST was in flight.
          d.resolve({ type: "superseded", id: "", data: { job: job && job.id }, receivedAt: now() });
          return job;
        }
        if (!job || typeof job !== "object" || !job.events_url) {
          var bad = apiError(0, null, "The server's answer had no events_url.");
          d.reject(bad);
          throw bad;
        }
        api.job = job;
        current = { job: job, es: null, done: d };
        ui["job-id"].textContent = String(job.id);
        ui["job-renderer"].textContent = String(job.renderer || renderer);
        setState(typeof job.state === "string" ? job.state : "queued");
        listen(current);
        return job;
      },
      function (err) {
        if (myTicket === seq) {
          ui["job-state"].textContent = "not started";
          ui["job-state"].setAttribute("data-state", "failed");
          announce("The render was not started: " + err.detail);
          showStartError(err, renderer);
        }
        d.reject(err);
        throw err;
      }
    );
  }

  function cancel() {
    var run = current;
    if (!run || !run.job.status_url) return Promise.reject(new Error("no render to cancel"));
    ui.cancel.disabled = true;
    announce("Cancelling render " + run.job.id + "…");
    return requestJSON("DELETE", run.job.status_url).then(
      function (body) {
        return body;
      },
      function (err) {
        if (run === current) {
          announce(err.status === 409
            ? "Render " + run.job.id + " had already finished."
            : "Could not cancel: " + err.detail);
          ui.cancel.disabled = !(api.state === "queued" || api.state === "running");
        }
        throw err;
      }
    );
  }

  // ------------------------------------------------------------------ form

  function isCard() {
    return ui.renderer.value === "card";
  }

  function syncRendererFields() {
    var card = isCard();
    // A disabled fieldset takes its fields out of validation and tab order.
    show(ui["card-fields"], card);
    ui["card-fields"].disabled = !card;
    show(ui["json-fields"], !card);
    ui["json-fields"].disabled = card;
    var opt = ui.renderer.options[ui.renderer.selectedIndex];
    var desc = opt ? opt.getAttribute("data-description") : null;
    ui["renderer-desc"].textContent = desc ||
      (card ? "The built-in ffmpeg title card." : "An operator-registered render command; give its params as JSON.");
    setFormError("");
  }

  function cardParams() {
    return {
      title: ui.title.value,
      subtitle: ui.subtitle.value,
      duration: Number(ui.duration.value),
      size: ui.size.value,
      fps: Number(ui.fps.value),
      background: ui.background.value,
      foreground: ui.foreground.value,
      accent: ui.accent.value
    };
  }

  function labelText(field) {
    var label = document.querySelector('label[for="' + field.id + '"]');
    return label ? label.textContent.replace(/\s+/g, " ").trim() : field.name;
  }

  // The form's params, or null after reporting what is wrong.
  function readForm() {
    if (isCard()) {
      var fields = ui["card-fields"].querySelectorAll("input, select");
      for (var i = 0; i < fields.length; i++) {
        var f = fields[i];
        if (!f.checkValidity()) {
          setFormError(labelText(f) + ": " + f.validationMessage, f);
          return null;
        }
      }
      return cardParams();
    }
    var text = ui["params-json"].value.trim() || "{}";
    var params;
    try {
      params = JSON.parse(text);
    } catch (e) {
      setFormError("params is not valid JSON: " + e.message, ui["params-json"]);
      return null;
    }
    if (params === null || typeof params !== "object" || Array.isArray(params)) {
      setFormError("params must be a JSON object, like {\"key\": \"value\"}.", ui["params-json"]);
      return null;
    }
    return params;
  }

  function onSubmit(e) {
    e.preventDefault();
    if (ui.start.disabled) return;
    setFormError("");
    var params = readForm();
    if (params === null) return;
    submitRender(ui.renderer.value, params);
  }

  function submitRender(renderer, params) {
    ui.start.disabled = true;
    ui.start.setAttribute("aria-busy", "true");
    return start(renderer, params).then(
      function () {
        ui.start.disabled = false;
        ui.start.removeAttribute("aria-busy");
      },
      function () {
        // start() has shown the error next to the form.
        ui.start.disabled = false;
        ui.start.removeAttribute("aria-busy");
      }
    );
  }

  // Show an API error next to the form, pointing at the offending field
  // when the detail names one ("params.duration: must be ...").
  function showStartError(err, renderer) {
    var field = null;
    var m = /^params\.([A-Za-z0-9_]+)/.exec(err.detail || "");
    var formMatches = ui.renderer.value === renderer;
    if (err.code === "unauthorized" || err.code === "forbidden") field = ui.token;
    else if (formMatches) {
      if (err.code === "unknown_renderer") field = ui.renderer;
      else if (!isCard() && err.code === "invalid_params") field = ui["params-json"];
      else if (m && isCard() && CARD_FIELDS.indexOf(m[1]) >= 0) field = ui[m[1]];
      else if (m && isCard() && (m[1] === "width" || m[1] === "height")) field = ui.size;
    }
    setFormError(err.detail || String(err), field);
  }

  function ensureOption(name) {
    for (var i = 0; i < ui.renderer.options.length; i++) {
      if (ui.renderer.options[i].value === name) return ui.renderer.options[i];
    }
    var opt = document.createElement("option");
    opt.value = name;
    opt.textContent = name;
    ui.renderer.appendChild(opt);
    return opt;
  }

  function loadRenderers() {
    return requestJSON("GET", "renderers").then(function (body) {
      var list = body && Array.isArray(body.renderers) ? body.renderers : [];
      api.renderers = list;
      var selected = ui.renderer.value;
      clearChildren(ui.renderer);
      list.forEach(function (r) {
        if (!r || typeof r.name !== "string") return;
        var opt = ensureOption(r.name);
        var desc = typeof r.description === "string" ? r.description
          : typeof r.summary === "string" ? r.summary : null;
        if (desc) opt.setAttribute("data-description", desc);
      });
      ensureOption("card");
      ensureOption(selected);
      ui.renderer.value = selected;
      syncRendererFields();
    }, function (err) {
      // Keep the built-in card renderer usable.
      ui["renderer-desc"].textContent = "Could not load the list of renderers (" + err.detail + ").";
    });
  }

  // Fill the card fields from a params object (for ?renderer=card&params=).
  function fillCard(params) {
    ["title", "subtitle", "background", "foreground", "accent"].forEach(function (k) {
      if (typeof params[k] === "string") ui[k].value = params[k];
    });
    ["duration", "fps"].forEach(function (k) {
      if (isNum(params[k])) ui[k].value = String(params[k]);
    });
    var size = typeof params.size === "string" ? params.size
      : isNum(params.width) && isNum(params.height) ? params.width + "x" + params.height : null;
    if (size) {
      for (var i = 0; i < ui.size.options.length; i++) {
        if (ui.size.options[i].value === size) ui.size.value = size;
      }
    }
  }

  function fromQuery() {
    var q = new URLSearchParams(window.location.search);
    var renderer = q.get("renderer");
    var rawParams = q.get("params");
    var auto = q.get("autostart");
    if (!renderer && rawParams === null) return;
    renderer = renderer || "card";
    ensureOption(renderer);
    ui.renderer.value = renderer;
    syncRendererFields();
    var params = {};
    if (rawParams !== null && rawParams !== "") {
      try {
        params = JSON.parse(rawParams);
      } catch (e) {
        setFormError("The params in the address are not valid JSON: " + e.message,
          renderer === "card" ? null : ui["params-json"]);
        if (renderer !== "card") ui["params-json"].value = rawParams;
        return;
      }
    }
    if (renderer === "card" && params && typeof params === "object") fillCard(params);
    else ui["params-json"].value = JSON.stringify(params, null, 2);
    if (auto === "1" || auto === "true" || auto === "yes") {
      submitRender(renderer, params);
    }
  }

  function storage() {
    try {
      return window.sessionStorage;
    } catch (e) {
      return null; // storage disabled: the field still works for this page
    }
  }

  // The token from the address fragment (handed over by an app's backend),
  // else the one kept for this tab; the fragment is removed at once.
  function loadToken() {
    var store = storage();
    var hash = new URLSearchParams(window.location.hash.replace(/^#/, ""));
    var handed = hash.get("access_token");
    if (handed !== null) {
      hash.delete("access_token");
      var rest = hash.toString();
      window.history.replaceState(window.history.state, "",
        window.location.pathname + window.location.search + (rest ? "#" + rest : ""));
      if (store) store.setItem(TOKEN_KEY, handed);
      ui.token.value = handed;
    } else if (store) {
      ui.token.value = store.getItem(TOKEN_KEY) || "";
    }
    ui.token.addEventListener("input", function () {
      var s = storage();
      if (!s) return;
      if (ui.token.value.trim()) s.setItem(TOKEN_KEY, ui.token.value.trim());
      else s.removeItem(TOKEN_KEY);
      if (ui.token.hasAttribute("aria-invalid")) setFormError("");
    });
  }

  function init() {
    bindUI();
    loadToken();
    ui["render-form"].addEventListener("submit", onSubmit);
    ui.renderer.addEventListener("change", syncRendererFields);
    ui.cancel.addEventListener("click", function () {
      cancel().catch(function () {});
    });
    ui["params-json"].addEventListener("input", function () {
      if (ui["params-json"].hasAttribute("aria-invalid")) setFormError("");
    });
    syncRendererFields();
    fromQuery();
    loadRenderers();
  }

  if (document.readyState === "loading") document.addEventListener("DOMContentLoaded", init);
  else init();
})();
