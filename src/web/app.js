// The model-relay page: sign in with an API token, list the workspace's runtimes, ask one
// for its models (answered at once from the server's catalog when it has a recent list, else
// by a discovery the page waits for), then pick a model, and its reasoning effort and
// service tier when it has them, or type a model ID. Per runtime, also: list its local
// skills and import one (its files shown as text), and update it to a target version.
//
// Everything the server sends is put in the page with textContent, never as HTML.
'use strict';

const TOKEN_KEY = 'model-relay.api-token';
// A read of a running discovery waits up to WAIT_MS at the server for its status to change
// (the server clamps it to its --max-wait), so the page learns of a change at once. A read
// answered sooner with nothing changed (a server that does not hold reads) is followed by
// the next one no sooner than POLL_MS after it was sent. The runtime list is refreshed
// every REFRESH_MS.
const WAIT_MS = 20000;
// An update's output changes while its status stays `running`, which does not end a held
// read: its reads wait at most this long, so the output shown is never older than that.
const PROGRESS_WAIT_MS = 2000;
const POLL_MS = 1000;
const REFRESH_MS = 10000;
// A poll that fails on the network this many times in a row ends the wait.
const MAX_POLL_FAILURES = 5;
const FAILED_TEXT = 'Could not discover models. Type a model ID or try again.';
// How the server's error begins when it refuses to hold a call: it is at its cap.
const CAP_TEXT = 'too many waiting calls';

const $ = (id) => document.getElementById(id);
const items = new Map(); // runtime id → its list item
// list item → {models: the list its picker shows, asks: how many times it was asked}. A
// background refresh applies only while no later ask has been made.
const states = new WeakMap();
let token = null;
let refreshTimer = null;

class SignedOut extends Error {}

// One API call: {status, body}, sending `payload` as JSON if given. A 401 signs the user
// out; a network failure throws.
async function api(method, path, payload) {
  const init = { method, headers: { Authorization: 'Bearer ' + token }, cache: 'no-store' };
  if (payload !== undefined) {
    init.headers['Content-Type'] = 'application/json';
    init.body = JSON.stringify(payload);
  }
  const response = await fetch(path, init);
  let body = null;
  try {
    body = await response.json();
  } catch (_) {
    body = null;
  }
  if (response.status === 401) {
    signOut('That API token was not accepted. Sign in again.');
    throw new SignedOut();
  }
  return { status: response.status, body };
}

function errorOf(answer) {
  return (answer.body && answer.body.error) || 'HTTP ' + answer.status;
}

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// Every runtime of the workspace: the list comes a page at a time (the server's default
// size), so follow `next_cursor` until the last page. The answer of the first page that is
// not 200, if any.
async function listRuntimes() {
  const runtimes = [];
  let path = '/api/runtimes';
  for (;;) {
    const answer = await api('GET', path);
    if (answer.status !== 200) {
      return answer;
    }
    runtimes.push(...answer.body.runtimes);
    const cursor = answer.body.next_cursor;
    if (!cursor) {
      return { status: 200, body: { runtimes } };
    }
    path = '/api/runtimes?cursor=' + encodeURIComponent(cursor);
  }
}

// ---- signing in and out ----

async function signIn(candidate) {
  token = candidate;
  $('signin-error').textContent = '';
  try {
    const answer = await listRuntimes();
    if (answer.status !== 200) {
      $('signin-error').textContent = 'Could not list runtimes: ' + errorOf(answer);
      return;
    }
    localStorage.setItem(TOKEN_KEY, candidate);
    $('signin').hidden = true;
    $('workspace').hidden = false;
    showRuntimes(answer.body.runtimes);
    clearInterval(refreshTimer);
    refreshTimer = setInterval(refresh, REFRESH_MS);
    $('refresh').focus();
  } catch (e) {
    if (!(e instanceof SignedOut)) {
      $('signin-error').textContent = 'Could not reach the server: ' + e.message;
    }
  }
}

function signOut(message) {
  token = null;
  localStorage.removeItem(TOKEN_KEY);
  clearInterval(refreshTimer);
  items.clear();
  $('runtimes').replaceChildren();
  $('workspace').hidden = true;
  $('signin').hidden = false;
  $('signin-error').textContent = message || '';
  $('token').value = '';
  $('token').focus();
}

// ---- the runtime list ----

async function refresh() {
  try {
    const answer = await listRuntimes();
    if (answer.status === 200) {
      showRuntimes(answer.body.runtimes);
    } else {
      $('runtimes-status').textContent = 'Could not list runtimes: ' + errorOf(answer);
    }
  } catch (e) {
    if (!(e instanceof SignedOut)) {
      $('runtimes-status').textContent = 'Could not reach the server: ' + e.message;
    }
  }
}

// Updates the list in place, so a refresh never wipes a discovery or a choice.
function showRuntimes(runtimes) {
  const list = $('runtimes');
  const seen = new Set();
  for (const runtime of runtimes) {
    seen.add(runtime.id);
    let item = items.get(runtime.id);
    if (!item) {
      item = newItem(runtime);
      items.set(runtime.id, item);
    }
    list.appendChild(item); // keeps the server's order
    const badge = item.querySelector('.badge');
    badge.textContent = runtime.status === 'online' ? 'online' : 'offline';
    badge.className = 'badge ' + (runtime.status === 'online' ? 'online' : 'offline');
  }
  for (const [id, item] of items) {
    if (!seen.has(id)) {
      item.remove();
      items.delete(id);
    }
  }
  $('runtimes-status').textContent = runtimes.length === 0
    ? 'No runtimes yet. Create one with POST /api/runtimes and start its daemon.'
    : runtimes.length + (runtimes.length === 1 ? ' runtime' : ' runtimes');
}

function newItem(runtime) {
  const item = $('runtime-template').content.firstElementChild.cloneNode(true);
  item.dataset.runtimeId = runtime.id;
  item.dataset.runtimeName = runtime.name;
  const heading = item.querySelector('.runtime-name');
  heading.textContent = runtime.name;
  item.querySelector('.runtime-provider').textContent = runtime.provider;
  states.set(item, { models: [], asks: 0 });
  const discoverButton = item.querySelector('.discover');
  discoverButton.setAttribute('aria-label', 'Discover models for ' + runtime.name);
  discoverButton.addEventListener('click', () => discover(runtime.id, item, false));
  const refreshButton = item.querySelector('.refresh-models');
  refreshButton.setAttribute('aria-label', 'Refresh models for ' + runtime.name);
  refreshButton.addEventListener('click', () => discover(runtime.id, item, true));
  const select = item.querySelector('.model-select');
  const input = item.querySelector('.model-input');
  select.addEventListener('change', () => {
    input.value = select.value;
    showChoice(item);
  });
  input.addEventListener('input', () => showChoice(item));
  for (const name of ['.effort-select', '.tier-select']) {
    item.querySelector(name).addEventListener('change', () => showChoice(item));
  }
  const listButton = item.querySelector('.list-skills');
  listButton.setAttribute('aria-label', 'List skills of ' + runtime.name);
  listButton.addEventListener('click', () => listSkills(runtime.id, item));
  item.querySelector('.update-version')
    .setAttribute('aria-label', 'Target version for ' + runtime.name);
  item.querySelector('.update-run').setAttribute('aria-label', 'Update ' + runtime.name);
  item.querySelector('.update-form').addEventListener('submit', (event) => {
    event.preventDefault();
    runUpdate(runtime.id, item);
  });
  return item;
}

// Says what is chosen, and offers the chosen model's reasoning-effort levels and service
// tiers (a typed ID that names a listed model counts as choosing it).
function showChoice(item) {
  const id = item.querySelector('.model-input').value.trim();
  const model = states.get(item).models.find((m) => m.id === id);
  const levels = (model && model.thinking && model.thinking.supported_levels) || [];
  const effort = showOptions(item, 'effort', id,
    levels.map((l) => [l.value, l.label || l.value, l.description]),
    model && model.thinking && model.thinking.default_level);
  const tiers = (model && model.service_tiers) || [];
  // No tier is anyone's default, so the first choice is to ask for none.
  const tier = showOptions(item, 'tier', id, tiers.length === 0 ? [] : [['', 'Default']]
    .concat(tiers.map((t) => [t.id, t.name || t.id, t.description])), '');
  let text = id ? 'Selected model: ' + id : '';
  if (id && effort) text += ', reasoning effort: ' + effort.textContent;
  if (id && tier && tier.value) text += ', service tier: ' + tier.textContent;
  item.querySelector('.chosen').textContent = text;
}

// Fills the `name` picker with `choices` ([value, label, description?] each) and shows it,
// or hides it when there are none; the chosen option, or null. Rebuilt only when the model
// or its choices change: the value chosen stays while the same model does, and a newly
// chosen model starts at `preferred`.
function showOptions(item, name, modelId, choices, preferred) {
  const field = item.querySelector('.' + name + '-field');
  const select = item.querySelector('.' + name + '-select');
  const key = JSON.stringify([modelId, choices]);
  if (select.dataset.key !== key) {
    const wanted = select.dataset.model === modelId ? select.value : preferred;
    select.replaceChildren();
    for (const [value, label, description] of choices) {
      const option = document.createElement('option');
      option.value = value;
      option.textContent = label;
      if (description) option.title = description;
      option.selected = value === wanted;
      select.appendChild(option);
    }
    select.dataset.key = key;
    select.dataset.model = modelId;
  }
  field.hidden = choices.length === 0;
  return choices.length === 0 ? null : select.options[select.selectedIndex];
}

// ---- discovery ----

// Asks for the runtime's models. Without `refresh` the server may answer at once from its
// catalog (then "as of" when that list was discovered); when it is not that recent, the
// answer names a discovery started behind it, which the page follows in the background.
// `refresh` (the Refresh button) skips the catalog: a discovery the page waits for.
async function discover(runtimeId, item, refresh) {
  const buttons = item.querySelectorAll('.discover, .refresh-models');
  // aria-disabled rather than disabled: a disabled button drops keyboard focus.
  if (buttons[0].getAttribute('aria-disabled') === 'true') return;
  for (const button of buttons) button.setAttribute('aria-disabled', 'true');
  const ask = ++states.get(item).asks;
  const base = '/api/runtimes/' + encodeURIComponent(runtimeId) + '/models';
  item.dataset.outcome = 'running';
  setOutcome(item, 'Discovering models…', '');
  let cached = null;
  try {
    const created = await api('POST', base, refresh ? { refresh: true } : undefined);
    if (created.status !== 200) throw new Error(errorOf(created));
    if (created.body.cached) cached = created.body;
    showOutcome(item, cached || await waitForEnd(base, created.body));
  } catch (e) {
    if (!(e instanceof SignedOut)) showFailure(item, e.message);
  } finally {
    for (const button of buttons) button.removeAttribute('aria-disabled');
  }
  if (cached && cached.refresh_id) followRefresh(base, item, ask, cached);
}

// Waits for the discovery behind a cached answer. A real list (or a real "none") replaces
// the cached one, keeping the chosen model if it is still offered; a failure, a timeout or a
// stand-in list leaves the cached list and says so quietly. A later ask makes this moot.
async function followRefresh(base, item, ask, cached) {
  let request;
  try {
    request = await waitForEnd(base, { id: cached.refresh_id, status: 'pending' });
  } catch (e) {
    if (e instanceof SignedOut) return;
    request = { status: 'failed', error: e.message };
  }
  if (states.get(item).asks !== ask) return;
  if (request.status === 'completed' && !request.fallback) {
    showOutcome(item, request, true);
  } else {
    const why = request.fallback ? 'the runtime sent a stand-in list'
      : request.error || 'the request ended as ' + request.status;
    item.querySelector('.outcome-detail').textContent =
      asOf(cached) + '; could not check for changes (' + why + ').';
  }
}

// Waits until `request` has ended, each read held at the server until its status changes.
// A server that holds as many calls as it may, or as many as this workspace's share,
// refuses a waiting read (503 or 429 "too many waiting calls…"): that says nothing of the
// discovery, so the page goes on reading without waiting, every POLL_MS, until it ends.
// `onRead`, if given, sees each record read on the way (an update's output while it runs);
// `waitMs` is how long each read may be held.
async function waitForEnd(base, request, onRead, waitMs = WAIT_MS) {
  const asker = token;
  let failures = 0;
  let wait = '?wait_ms=' + waitMs;
  while (request.status === 'pending' || request.status === 'running') {
    if (token !== asker) throw new SignedOut(); // signed out meanwhile: stop asking
    const sent = Date.now();
    let answer;
    try {
      answer = await api('GET', base + '/' + encodeURIComponent(request.id) + wait);
    } catch (e) {
      if (e instanceof SignedOut || ++failures >= MAX_POLL_FAILURES) throw e;
      await sleep(POLL_MS);
      continue;
    }
    failures = 0;
    const capped = answer.status === 503 || answer.status === 429;
    if (capped && wait && errorOf(answer).startsWith(CAP_TEXT)) {
      wait = '';
      continue;
    }
    if (answer.status !== 200) throw new Error(errorOf(answer));
    const unchanged = answer.body.status === request.status;
    request = answer.body;
    if (onRead) onRead(request);
    const early = POLL_MS - (Date.now() - sent);
    if (unchanged && early > 0) await sleep(early);
  }
  return request;
}

// `keepChoice`: the list replaces one the user may have picked from already.
function showOutcome(item, request, keepChoice) {
  const models = request.models || [];
  if (request.status !== 'completed') {
    showFailure(item, request.error || 'the request ended as ' + request.status);
  } else if (models.length === 0) {
    item.dataset.outcome = 'none';
    setOutcome(item, 'No models available',
      request.supported === false
        ? 'This runtime cannot list its models. Type a model ID if you know it.'
        : 'The runtime reported an empty list. Type a model ID if you know it.');
    showPicker(item, [], keepChoice);
  } else {
    item.dataset.outcome = 'found';
    let detail = '';
    if (request.cached) {
      detail = asOf(request) +
        (request.refresh_id ? '; checking the runtime for changes…' : '.');
    }
    setOutcome(item, 'Found ' + models.length + (models.length === 1 ? ' model.' : ' models.') +
      ' Pick one, or type a model ID.', detail);
    showPicker(item, models, keepChoice);
  }
}

// "Saved list as of <local time>", from a cached answer's `cached_at`.
function asOf(cached) {
  const at = new Date(cached.cached_at);
  if (Number.isNaN(at.getTime())) return 'Saved list';
  const today = at.toDateString() === new Date().toDateString();
  return 'Saved list as of ' + (today ? at.toLocaleTimeString() : at.toLocaleString());
}

function showFailure(item, error) {
  item.dataset.outcome = 'failed';
  setOutcome(item, FAILED_TEXT, 'Server said: ' + error);
  showPicker(item, []);
}

function setOutcome(item, text, detail) {
  item.querySelector('.outcome-text').textContent = text;
  item.querySelector('.outcome-detail').textContent = detail;
}

function showPicker(item, models, keepChoice) {
  states.get(item).models = models;
  const field = item.querySelector('.select-field');
  const select = item.querySelector('.model-select');
  const input = item.querySelector('.model-input');
  const chosen = input.value.trim();
  select.replaceChildren();
  for (const model of models) {
    const option = document.createElement('option');
    option.value = model.id;
    option.textContent = model.label + (model.default ? ' (default)' : '');
    option.selected = model.default === true;
    select.appendChild(option);
  }
  field.hidden = models.length === 0;
  if (keepChoice && models.some((m) => m.id === chosen)) {
    select.value = chosen;
  } else if (models.length > 0) {
    input.value = select.value;
    // Only when the user asked: a list that changes behind them leaves focus alone.
    if (!keepChoice) select.focus();
  }
  showChoice(item);
}

// ---- skills and updates ----

// Runs `work` with `button` marked busy (aria-disabled keeps keyboard focus); a second
// press while it runs does nothing.
async function busy(button, work) {
  if (button.getAttribute('aria-disabled') === 'true') return;
  button.setAttribute('aria-disabled', 'true');
  try {
    await work();
  } finally {
    button.removeAttribute('aria-disabled');
  }
}

// Asks for a request of the kind at `path` (`local-skills`, …) and waits until it ends.
async function ask(runtimeId, path, payload, onRead, waitMs) {
  const base = '/api/runtimes/' + encodeURIComponent(runtimeId) + '/' + path;
  const created = await api('POST', base, payload);
  if (created.status !== 200) throw new Error(errorOf(created));
  if (onRead) onRead(created.body);
  return waitForEnd(base, created.body, onRead, waitMs);
}

function listSkills(runtimeId, item) {
  const status = item.querySelector('.skills-status');
  const list = item.querySelector('.skills-list');
  return busy(item.querySelector('.list-skills'), async () => {
    status.textContent = 'Listing skills…';
    item.dataset.skills = 'running';
    try {
      const request = await ask(runtimeId, 'local-skills', undefined);
      if (request.status !== 'completed') {
        throw new Error(request.error || 'the request ended as ' + request.status);
      }
      const skills = request.skills || [];
      list.replaceChildren(...skills.map((skill) => skillItem(runtimeId, item, skill)));
      item.dataset.skills = 'done';
      status.textContent = request.supported === false
        ? 'This runtime does not report its skills.'
        : skills.length === 0 ? 'No skills on this runtime.'
        : skills.length + (skills.length === 1 ? ' skill.' : ' skills.');
    } catch (e) {
      if (e instanceof SignedOut) return;
      item.dataset.skills = 'failed';
      status.textContent = 'Could not list skills: ' + e.message;
    }
  });
}

function skillItem(runtimeId, item, skill) {
  const li = $('skill-template').content.firstElementChild.cloneNode(true);
  li.dataset.key = skill.key;
  li.querySelector('.skill-name').textContent = skill.name;
  li.querySelector('.skill-key').textContent = skill.key;
  li.querySelector('.skill-files').textContent =
    skill.file_count + (skill.file_count === 1 ? ' file' : ' files');
  li.querySelector('.skill-description').textContent = skill.description || '';
  const button = li.querySelector('.import-skill');
  button.setAttribute('aria-label', 'Import ' + skill.name);
  button.addEventListener('click', () => importSkill(runtimeId, item, skill, button));
  return li;
}

// Imports one skill and shows its files, SKILL.md first, each as text.
function importSkill(runtimeId, item, skill, button) {
  const box = item.querySelector('.imported');
  const status = item.querySelector('.imported-status');
  const files = item.querySelector('.imported-files');
  return busy(button, async () => {
    box.hidden = false;
    item.querySelector('.imported-title').textContent = 'Import of ' + skill.name;
    status.textContent = 'Importing…';
    files.replaceChildren();
    item.dataset.imported = 'running';
    const payload = { skill_key: skill.key, name: skill.name };
    if (skill.description) payload.description = skill.description;
    try {
      const request = await ask(runtimeId, 'local-skills/import', payload);
      if (request.status !== 'completed' || !request.skill) {
        throw new Error(request.error || 'the request ended as ' + request.status);
      }
      const all = [{ path: 'SKILL.md', content: request.skill.content }]
        .concat(request.skill.files || []);
      for (const file of all) {
        const heading = document.createElement('h6');
        heading.textContent = file.path;
        const text = document.createElement('pre');
        text.className = 'file-content';
        text.textContent = file.content;
        files.append(heading, text);
      }
      item.dataset.imported = 'done';
      status.textContent = 'Imported ' + all.length + (all.length === 1 ? ' file.' : ' files.');
    } catch (e) {
      if (e instanceof SignedOut) return;
      item.dataset.imported = 'failed';
      status.textContent = 'Could not import: ' + e.message;
    }
  });
}

// Updates the runtime to the version typed, showing its output as it comes.
function runUpdate(runtimeId, item) {
  const status = item.querySelector('.update-status');
  const output = item.querySelector('.update-output');
  const version = item.querySelector('.update-version').value.trim();
  if (!version) {
    status.textContent = 'Enter a target version.';
    return Promise.resolve();
  }
  const show = (request) => {
    output.hidden = !request.output;
    output.textContent = request.output || '';
  };
  return busy(item.querySelector('.update-run'), async () => {
    status.textContent = 'Updating to ' + version + '…';
    output.hidden = true;
    item.dataset.update = 'running';
    try {
      const request = await ask(runtimeId, 'update', { target_version: version }, show,
        PROGRESS_WAIT_MS);
      show(request);
      if (request.status === 'completed') {
        item.dataset.update = 'done';
        status.textContent = 'Updated to ' + version + '.';
      } else {
        item.dataset.update = 'failed';
        status.textContent = 'The update failed: ' +
          (request.error || 'the request ended as ' + request.status);
      }
    } catch (e) {
      if (e instanceof SignedOut) return;
      item.dataset.update = 'failed';
      status.textContent = 'Could not update: ' + e.message;
    }
  });
}

// ---- start ----

function start() {
  $('signin-form').addEventListener('submit', (event) => {
    event.preventDefault();
    const candidate = $('token').value.trim();
    if (candidate) {
      signIn(candidate);
    } else {
      $('signin-error').textContent = 'Enter an API token.';
    }
  });
  $('signout').addEventListener('click', () => signOut(''));
  $('refresh').addEventListener('click', refresh);

  // A link pasted into an open page changes only the fragment: no reload, so listen.
  window.addEventListener('hashchange', () => {
    const fromUrl = tokenFromUrl();
    if (fromUrl) signIn(fromUrl);
  });
  const saved = tokenFromUrl() || localStorage.getItem(TOKEN_KEY);
  if (saved) {
    signIn(saved);
  } else {
    $('token').focus();
  }
}

// `model-relay demo` links to the page as /#token=…: take the token, then drop it from the
// address bar and the history.
function tokenFromUrl() {
  const fromUrl = new URLSearchParams(location.hash.slice(1)).get('token');
  if (fromUrl) {
    history.replaceState(null, '', location.pathname + location.search);
  }
  return fromUrl;
}

start();
